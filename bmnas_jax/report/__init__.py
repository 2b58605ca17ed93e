"""The report stage: tables, curves and genotype drawings from a run directory."""
