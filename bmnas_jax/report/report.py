"""The report stage: reads a run directory, writes report.md plus PNGs and CSVs under report/."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from typing import Any, Mapping

import jax

from bmnas_jax import diagnostics, ops
from bmnas_jax import genotype as genotype_lib
from bmnas_jax.baselines import baseline_specs, stage_of
from bmnas_jax.checkpoint import disk_errors, read_json, read_jsonl, write_text_atomic
from bmnas_jax.report import genotype_plot, plots, tables
from bmnas_jax.report.tables import Stat, Table
from bmnas_jax.summary import describe
from bmnas_jax.errors import DataError

REPORT_MD = "report.md"
REPORT_DIR = "report"
REQUIRED = ("search/metrics.jsonl", "search/summary.json", "search/best_genotype.json",
            "evaluate/metrics.json")
FEATURE_SELECTION_NAMES = {"random": "Random", "late_fusion": "Late fusion",
                           "searched": "Searched (BM-NAS)"}
FUSION_FRAMEWORKS = {"Sum": "DARTS (ICLR19)", "ConcatFC": "MFAS (CVPR19)",
                     "MHA": "Transformer (NIPS17)", "AoA": "AoANet (ICCV19)",
                     "searched": "BM-NAS"}


# ------------------------------------------------------------------ inputs

def _read_json(path: str) -> Any:
  return read_json(path)


def _read_jsonl(path: str) -> list[dict]:
  return read_jsonl(path)


@dataclasses.dataclass
class RunFiles:
  """What earlier stages wrote; optional inputs are None when absent."""
  search_records: list[dict]
  search_summary: dict
  genotype: genotype_lib.Genotype
  evaluate: dict
  arch_history: dict | None = None
  evaluate_records: list[dict] | None = None
  baselines: list[dict] = dataclasses.field(default_factory=list)   # baselines.baseline_specs
                                    # entries + `result` (metrics.json) and `records` (jsonl)
  unimodal: list[dict] | None = None
  prepare: dict | None = None
  ablate: dict | None = None
  finetune: dict | None = None      # evaluate_finetune/metrics.json (backbones fine-tuned)


def _optional(workdir: str, rel: str, reader):
  path = os.path.join(workdir, rel)
  return reader(path) if os.path.exists(path) else None


def unimodal_rows(obj: Any) -> list[dict]:
  """Normalizes `backbones/unimodal.json` to a list of {name, modality, ...} dicts.

  Accepts modality -> {"backbone", "val_accuracy", "test_accuracy", ...} (the
  mfeat pipeline's form), name -> {"modality", ...}, or a list of objects with
  a `name` (or `backbone`) key.
  """
  rows = []
  items = obj.items() if isinstance(obj, Mapping) else ((None, v) for v in obj)
  for key, v in items:
    if not isinstance(v, Mapping):
      raise DataError(f"backbones/unimodal.json: entry {key!r} is not an object: {v!r}")
    if "backbone" in v:
      name, modality = v["backbone"], v.get("modality", key)
    else:
      name, modality = v.get("name", key), v.get("modality")
    rows.append({**v, "name": name, "modality": modality or "?"})
  return rows


def read_run(config, workdir: str) -> RunFiles:
  """Reads the run directory; raises DataError when a required file is missing."""
  missing = [r for r in REQUIRED if not os.path.exists(os.path.join(workdir, r))]
  if missing:
    raise DataError(f"{workdir}: the report needs {', '.join(missing)} "
                    f"(run the search and evaluate stages first)")
  ablate = _optional(workdir, "ablate/results.json", _read_json)
  unimodal = _optional(workdir, "backbones/unimodal.json", _read_json)
  genotype = genotype_lib.load(os.path.join(workdir, "search/best_genotype.json"))
  return RunFiles(
      search_records=_read_jsonl(os.path.join(workdir, "search/metrics.jsonl")),
      search_summary=_read_json(os.path.join(workdir, "search/summary.json")),
      genotype=genotype,
      evaluate=_read_json(os.path.join(workdir, "evaluate/metrics.json")),
      arch_history=_optional(workdir, "search/arch_history.json", _read_json),
      evaluate_records=_optional(workdir, "evaluate/metrics.jsonl", _read_jsonl),
      baselines=[{**spec, "result": _optional(workdir, f"{stage_of(spec['name'])}/metrics.json",
                                              _read_json),
                  "records": _optional(workdir, f"{stage_of(spec['name'])}/metrics.jsonl",
                                       _read_jsonl)}
                 for spec in baseline_specs(config, genotype.nodes)],
      unimodal=None if unimodal is None else unimodal_rows(unimodal),
      prepare=_optional(workdir, "features/prepare.json", _read_json),
      finetune=_optional(workdir, "evaluate_finetune/metrics.json", _read_json),
      ablate=ablate)


# ------------------------------------------------------------------ helpers

def modality_string(g: genotype_lib.Genotype) -> str:
  """`Image + Text`: the modalities of the features a genotype uses."""
  return " + ".join(genotype_plot.modalities(g.used_nodes()))


def _unimodal_stat(row: Mapping[str, Any], split: str, metric: str) -> tuple[Stat | None, str]:
  """The row's `split` score as a Stat and the metric it is in (`accuracy` as fallback)."""
  for key, name in ((f"{split}_{metric}", metric), (f"{split}_metric", metric),
                    (f"{split}_accuracy", "accuracy")):
    v = row.get(key)
    if v is None:
      continue
    return (Stat.from_summary(v) if isinstance(v, Mapping) else Stat(float(v))), name
  return None, metric


def compact_genotype_json(g: genotype_lib.Genotype) -> str:
  """The genotype's JSON with one line per Cell (valid JSON, same object as `to_json`)."""
  d = g.to_json_dict()
  cells = ",\n  ".join(json.dumps(c) for c in d["cells"])
  return (f'{{"format": {json.dumps(d["format"])},\n "nodes": {json.dumps(d["nodes"])},\n'
          f' "cells": [\n  {cells}],\n "concat": {json.dumps(d["concat"])}}}')


def _note(text: str) -> str:
  return f"_{text}_\n"


def _device() -> str:
  d = jax.devices()[0]
  return f"{jax.device_count()} × {d.device_kind} ({d.platform})"


def _cfg(config, dotted: str, default=None):
  node = config
  for part in dotted.split("."):
    try:
      node = node[part]
    except (KeyError, TypeError, AttributeError):
      return default
  return node


def _fmt_list(values) -> str:
  return ", ".join(str(v) for v in values)


# ------------------------------------------------------------------ sections

class _Builder:
  """Accumulates markdown, tables (written as CSV) and images in a staging folder."""

  def __init__(self, config, run: RunFiles, stage_dir: str):
    self.config, self.run, self.stage_dir = config, run, stage_dir
    self.parts: list[str] = []
    self.tables: list[Table] = []
    self.metric = run.evaluate.get("metric") or run.search_summary.get("metric", "accuracy")
    self.label = tables.metric_label(self.metric)

  def add(self, text: str) -> None:
    self.parts.append(text.rstrip("\n") + "\n")

  def table(self, t: Table, footnote: str = "") -> None:
    self.tables.append(t)
    tables.write_csv(t, self.stage_dir)
    text = t.markdown() + f"\nCSV: [{REPORT_DIR}/{t.name}.csv]({REPORT_DIR}/{t.name}.csv)\n"
    if footnote:
      text += "\n" + footnote + "\n"
    self.add(text)

  def image(self, name: str, alt: str) -> str:
    """Staging path for `name`; adds the markdown embedding with a relative path."""
    self.add(f"![{alt}]({REPORT_DIR}/{name})")
    return os.path.join(self.stage_dir, name)

  # -- header
  def header(self) -> None:
    c, r = self.config, self.run
    s, ev = r.search_summary, r.evaluate
    name = _cfg(c, "name", "") or "experiment"
    self.add(f"# BM-NAS report: {name} (fidelity: {_cfg(c, 'fidelity', 'paper')})")
    lines = [
        f"- Metric: {self.label} (`{self.metric}`); values in percent, mean ± std over seeds.",
        f"- Search: {s.get('epochs_done', len(r.search_records))} epochs, seeds "
        f"[{_fmt_list(s.get('seeds', []))}], alternation `{_cfg(c, 'search.alternation', '?')}`,"
        f" two_slot={_cfg(c, 'model.two_slot', False)}, cell_inputs "
        f"`{_cfg(c, 'model.cell_inputs', 'all')}`.",
        f"- Model: {_cfg(c, 'model.num_cells', '?')} Cells (head reads the last "
        f"{_cfg(c, 'model.multiplier', '?')}), {_cfg(c, 'model.steps', '?')} steps per Cell "
        f"(last {_cfg(c, 'model.node_multiplier', '?')} concatenated), C={_cfg(c, 'model.C')}, "
        f"L={_cfg(c, 'model.L')}.",
        f"- Evaluation: {ev.get('epochs', '?')} epochs on "
        f"{' + '.join(ev.get('train_splits', []))}, seeds [{_fmt_list(ev.get('seeds', []))}].",
    ]
    self.add("\n".join(lines))

  # -- the winner, first
  def winner(self) -> None:
    """One line on top: which results row won on test, and by how much against the
    runner-up, in points and in seed standard deviations."""
    rows = [(label, stat) for label, _, stat in self.result_rows()[0]
            if isinstance(stat, Stat) and "val-selected" not in label]
    if len(rows) < 2:
      return
    (best, b), (second, r2) = sorted(rows, key=lambda row: -row[1].mean)[:2]
    diff = 100 * (b.mean - r2.mean)
    stds = [100 * x.std for x in (b, r2) if x.std]
    text = (f"**Best on test: {best}, {b} % {self.label}; {diff:.2f} points above "
            f"{second} ({r2} %)")
    if stds:
      text += f", {diff / max(stds):.1f} seed std"
      text += (". Within one seed std: no clear winner.**" if diff < max(stds) else ".**")
    else:
      text += ".**"
    self.add(text)

  # -- Tables 1-3
  def result_rows(self) -> tuple[list[list], list[str]]:
    """The results table's rows `[method, modality, Stat]` and notes on what is absent."""
    r, ev = self.run, self.run.evaluate
    rows, notes = [], []
    if r.unimodal is None:
      notes.append("No unimodal backbone results (backbones/unimodal.json is absent).")
    else:
      for u in r.unimodal:
        stat, used = _unimodal_stat(u, "test", self.metric)
        label = u["name"] if used == self.metric else f"{u['name']} ({tables.metric_label(used)})"
        rows.append([label, u["modality"], stat])
    ens = (r.prepare or {}).get("ensemble")
    if ens and ens.get("metric") == self.metric and "test" in ens:
      rows.append(["Ensemble of the backbones (mean probability, no training)",
                   " + ".join(ens.get("modalities", [])), Stat(float(ens["test"]))])
    for b in r.baselines:
      if b["result"] is None:
        notes.append(f"No {b['label']} row ({stage_of(b['name'])}/metrics.json is absent).")
      else:
        rows.append([b["label"], b["modality"], Stat.from_summary(b["result"]["final_test"])])
    mods = modality_string(r.genotype)
    rows.append(["BM-NAS (searched), final epoch", mods, Stat.from_summary(ev["final_test"])])
    vs = ev.get("val_selected")
    if vs:
      held = ("val held out" if vs.get("val_held_out")
              else "val not held out: it is among the training splits")
      rows.append([f"BM-NAS (searched), val-selected epoch ({held})", mods,
                   Stat.from_summary(vs["test"])])
    if r.finetune is not None:
      rows.append([f"BM-NAS (searched), backbones fine-tuned (lr x "
                   f"{r.finetune.get('backbone_lr_mult', '?')}), final epoch", mods,
                   Stat.from_summary(r.finetune["final_test"])])
    return rows, notes

  def results(self) -> None:
    r, ev = self.run, self.run.evaluate
    self.add("## Results (Tables 1-3 form)")
    rows, notes = self.result_rows()
    vs = ev.get("val_selected")
    foot = (f"Test {self.label} at the final retraining epoch, mean ± std over "
            f"{len(ev.get('seeds', []))} seeds.")
    if vs:
      foot += (f" The val-selected row takes per seed the epoch with the best validation "
               f"{self.label} (epochs [{_fmt_list(vs.get('epoch', []))}]); the test split "
               f"selects nothing.")
    if r.unimodal is not None:
      foot += " Backbone rows: the backbone's own test score (one training run)."
    if r.baselines:
      foot += (" Baseline rows (bmnas_jax/baselines.py) are retrained on the stored features "
               "like the searched network: same splits, epochs, optimizer and seeds.")
    if any(row[0].startswith("Ensemble") for row in rows):
      foot += (" Ensemble: the backbones' predicted probabilities averaged, scored as the "
               "other rows.")
    self.table(Table("results", f"Table 1-3 form: test {self.label} on {_cfg(self.config, 'name')}",
                     ["Method", "Modality", f"{self.label}(%)"], rows), foot)
    for n in notes:
      self.add(_note(n))

  # -- what the stored features keep
  def features(self) -> None:
    probes = (self.run.prepare or {}).get("probes") or []
    if not probes:
      return
    self.add("## Stored features: linear probes")
    rows = []
    for p in probes:
      own = p.get("backbone_val")
      rows.append([p["node"], p["tap"], p["pool"], f"{p['C_in']} x {p['L_in']}",
                   Stat(p["probe_val"]), None if own is None else Stat(own),
                   None if p.get("kept") is None else f"{100 * p['kept']:.0f}%"])
    metric = tables.metric_label(probes[0]["metric"])
    self.table(Table("probes", f"Linear probes on the pooled taps (validation {metric})",
                     ["Node", "Tap", "Pool", "C_in x L_in", "Probe (%)", "Backbone (%)",
                      "Kept"], rows),
               f"A logistic regression on each stored feature (standardized, trained on up to "
               f"{probes[0].get('train_examples', '?')} train examples) against the "
               f"backbone's own validation score: how much of what the backbone knows the "
               f"pooled feature keeps. A low share for the last tap of a modality suggests a "
               f"larger L_in or another pool mode.")

  # -- Table 4
  def params(self) -> None:
    r = self.run
    self.add("## Model size (Table 4 form)")
    rows = []
    specs = [("BM-NAS searched (fixed net)", r.genotype,
              Stat.from_summary(r.evaluate["final_test"]))]
    specs += [(b["label"], b.get("genotype") or b.get("model"),
               Stat.from_summary(b["result"]["final_test"]))
              for b in r.baselines if b["result"] is not None]
    specs.append(("Search hypernet", None, None))
    for label, g, stat in specs:
      d = describe(self.config, genotype=g) if not hasattr(g, "apply") else describe(
          self.config, model=g)
      p = d["params_per_part"]
      rows.append([label, _cfg(self.config, "name"), tables.format_params(d["params_total"]),
                   d["params_total"], p["reshape"], p["fusion"], p["head"], stat])
    self.table(Table("params", "Table 4 form: fusion model parameters",
                     ["Model", "Dataset", "Parameters", "Exact", "Reshape", "Fusion", "Head",
                      f"{self.label}(%)"], rows),
               "Parameters of the fusion model only (the backbones are frozen and run once, "
               "before search); BatchNorm running statistics are not parameters.")

  # -- Table 5
  def cost(self) -> None:
    r = self.run
    s, ev = r.search_summary, r.evaluate
    self.add("## Search cost (Table 5 form)")
    device = _device()
    n_search = len(s.get("seeds", [])) or 1
    rows = [["BM-NAS search", tables.format_seconds(s["seconds"]),
             tables.format_hours(s["seconds"]), device,
             f"{s.get('epochs_done', '?')} epochs, {n_search} seeds together under vmap"]]
    notes = []
    seconds = (r.prepare or {}).get("extraction_seconds")
    if seconds is not None:
      rows.append(["Feature extraction (backbones, once)", tables.format_seconds(seconds),
                   tables.format_hours(seconds), device, "not part of search"])
    else:
      notes.append("No feature-extraction time recorded (features/prepare.json is absent).")
    if r.unimodal is not None:
      secs = [float(u["train_seconds"]) for u in r.unimodal if "train_seconds" in u]
      if secs:
        rows.append(["Unimodal backbone training", tables.format_seconds(sum(secs)),
                     tables.format_hours(sum(secs)), device, f"{len(secs)} backbones"])
    if "seconds" in ev:
      rows.append(["Evaluation (retraining)", tables.format_seconds(ev["seconds"]),
                   tables.format_hours(ev["seconds"]), device,
                   f"{ev.get('epochs', '?')} epochs, {len(ev.get('seeds', []))} seeds under vmap"])
    done = [b["result"] for b in r.baselines if b["result"] and "seconds" in b["result"]]
    if done:
      secs = sum(x["seconds"] for x in done)
      rows.append(["Baselines (training)", tables.format_seconds(secs),
                   tables.format_hours(secs), device,
                   f"{len(done)} baselines, {len(done[0].get('seeds', []))} seeds each"])
    self.table(Table("search_cost", "Table 5 form: search cost (device-hours = seconds / 3600)",
                     ["Stage", "Wall seconds", "Device-hours", "Device", "Notes"], rows),
               "Search runs on precomputed features, so its cost excludes the backbones "
               "(the paper's Table 5 runs them every step); extraction is listed separately. "
               "Device: as seen by the process that wrote this report.")
    for n in notes:
      self.add(_note(n))

  # -- Tables 6 and 7
  def ablations(self) -> None:
    r = self.run
    self.add("## Ablations (Tables 6 and 7 form)")
    if r.ablate is None:
      self.add(_note("No ablation results (ablate/results.json is absent): Tables 6 and 7 "
                     "skipped."))
      return
    dataset = _cfg(self.config, "name")
    rows_in = r.ablate.get("rows", [])
    searched = Stat.from_summary(r.evaluate["final_test"])

    fs = [x for x in rows_in if x.get("table") == "feature_selection"]
    rows, trials, notes = [], [], []
    for x in fs:
      name = x["name"]
      n_geno = len(x.get("genotypes", []))
      if name.startswith("random_"):
        trials.append([f"Random genotype {name.split('_', 1)[1]}", dataset,
                       Stat.from_summary(x["test"]), n_geno])
        continue
      label = FEATURE_SELECTION_NAMES.get(name, name)
      if name == "random":
        label = f"Random (mean over {n_geno} genotypes)"
      rows.append([label, dataset, Stat.from_summary(x["test"]), n_geno])
      if x.get("note"):
        notes.append(f"{label}: {x['note']}.")
    if not any(x["name"] == "searched" for x in fs):
      rows.append([FEATURE_SELECTION_NAMES["searched"], dataset, searched, 1])
    self.table(Table("feature_selection", f"Table 6 form: feature selection ({self.label})",
                     ["Features", "Dataset", f"{self.label}(%)", "Genotypes"], rows + trials),
               " ".join(["Final-epoch test, mean ± std over seeds (Random: over genotypes)."]
                        + notes))

    fu = [x for x in r.ablate.get("rows", []) if x.get("table") == "fusion"]
    rows = []
    for x in fu:
      name = x["name"]
      rows.append(["Searched" if name == "searched" else name,
                   FUSION_FRAMEWORKS.get(name, ""), dataset, Stat.from_summary(x["test"])])
    if not any(x["name"] == "searched" for x in fu):
      rows.append(["Searched", FUSION_FRAMEWORKS["searched"], dataset, searched])
    self.table(Table("fusion", f"Table 7 form: fusion strategy ({self.label})",
                     ["Fusion", "Framework", "Dataset", f"{self.label}(%)"], rows),
               "Every row keeps the searched feature selection and replaces each Cell's "
               "inside (Fig. 2 cells); final-epoch test, mean ± std over seeds.")

  # -- seeds
  def agreement(self) -> None:
    s = self.run.search_summary
    self.add("## Search seeds and their agreement")
    seeds = s.get("seeds", [])
    best, epochs = s.get("best_val_metric", []), s.get("best_epoch", [])
    rows = [[seed, Stat(float(best[i])) if i < len(best) else None,
             epochs[i] if i < len(epochs) else None,
             "yes" if seed == s.get("chosen_seed") else "no"] for i, seed in enumerate(seeds)]
    self.table(Table("search_seeds", f"Search: best validation {self.label} per seed",
                     ["Seed", f"best val {self.label}(%)", "Best epoch", "Chosen"], rows),
               "The chosen seed's best-by-validation genotype is `search/best_genotype.json`.")
    ag = s.get("agreement")
    if not ag:
      self.add(_note("No agreement summary in search/summary.json."))
      return
    self.add(f"{ag.get('distinct_genotypes', '?')} distinct genotype(s) over {len(seeds)} "
             f"seed(s); the most common one was found by {ag.get('most_common_count', '?')}.")
    fmt = lambda d: "; ".join(f"{k} ×{v}" for k, v in d.items())
    rows = [[f"Cell_{k + 1}", fmt(c.get("inputs", {})), fmt(c.get("ops", {}))]
            for k, c in enumerate(ag.get("cells", []))]
    self.table(Table("agreement", "Seed agreement per Cell (count of seeds)",
                     ["Cell", "Input pairs", "Step ops"], rows))

  # -- did the search decide?
  def decisions(self) -> None:
    r = self.run
    if r.arch_history is None or not r.arch_history.get("softmax"):
      return
    d = diagnostics.search_decisions(r.arch_history, r.search_summary, r.genotype.nodes,
                                     self.config)
    self.add("## Did the search decide?")
    rows = []
    for seed in d["seeds"]:
      for k, cell in enumerate(seed["cells"]):
        ops = "; ".join(f"{st['op']} (+{100 * st['op_margin']:.1f} over {st['next_op']})"
                        for st in cell["steps"])
        rows.append([seed["seed"], seed["epoch"], f"Cell_{k + 1}",
                     f"({', '.join(cell['pair'])})",
                     f"({', '.join(cell['runner_up'])})" if cell["runner_up"] else None,
                     f"{100 * cell['pair_margin']:.1f}%", ops,
                     f"{seed['entropy_ratio']:.3f}"])
    t = d["thresholds"]
    self.table(Table("decisions", "Margins of the derivation's choices (best epoch per seed)",
                     ["Seed", "Epoch", "Cell", "Pair", "Runner-up", "Pair margin",
                      "Step ops (weight points over the next op)", "Entropy / max"], rows),
               f"Pair margin: how much the chosen pair's score (the product of its two "
               f"Identity weights, Eq. 3) exceeds the runner-up's, relative to it. Entropy / "
               f"max: the mean entropy of the softmaxed architecture weights over its uniform "
               f"maximum (1: nothing learned). A choice counts as made when the pair margin is "
               f"at least {100 * t['pair_margin']:.0f}% and an op leads by at least "
               f"{100 * t['op_margin']:.0f} points.")
    if d["decided"]:
      self.add(f"Every choice was made clearly ({d['choices']} choices over "
               f"{len(d['seeds'])} seed(s)).")
    else:
      self.add(f"**The search did not decide:** {d['undecided']} of {d['choices']} choices "
               f"(Cell input pairs and step ops, over {len(d['seeds'])} seed(s)) are below "
               f"those margins. The genotype then reflects noise in the architecture weights "
               f"more than what the data favour: different seeds pick different genotypes, "
               f"and the searched row should be read against the random-selection row of "
               f"Table 6 before it is credited to the search.")

  # -- genotype
  def genotype(self) -> None:
    g = self.run.genotype
    self.add("## Best genotype")
    lines = []
    for k, cell in enumerate(g.cells):
      steps = ", ".join(f"Step {j + 1} = {st.op}({plots.inner_name(st.inputs[0])}, "
                        f"{plots.inner_name(st.inputs[1])})" for j, st in enumerate(cell.steps))
      cat = ", ".join(plots.inner_name(v) for v in cell.concat)
      lines.append(f"- Cell_{k + 1}: x = {g.upper_name(cell.inputs[0])}, y = "
                   f"{g.upper_name(cell.inputs[1])}; {steps}; concat [{cat}].")
    lines.append(f"- Head reads: {', '.join(g.upper_name(u) for u in g.concat)}. Used features: "
                 f"{', '.join(g.used_nodes())}.")
    self.add("\n".join(lines))
    self.add("```json\n" + compact_genotype_json(g) + "\n```")
    genotype_plot.draw_genotype(g, self.image("genotype.png", "best genotype"),
                                title=f"Best genotype ({_cfg(self.config, 'name')})")

  # -- curves
  def curves(self) -> None:
    r = self.run
    self.add("## Curves")
    self.add("### Search")
    plots.search_metric_curves(r.search_records,
                               self.image("search_val_metric.png", "search validation metric"),
                               self.label)
    history = r.arch_history or {}
    max_entropy = (diagnostics.max_entropy(history["softmax"][0][0])
                   if history.get("softmax") else None)
    plots.search_loss_curves(r.search_records, self.image("search_losses.png", "search losses"),
                             max_entropy)
    if r.arch_history is None:
      self.add(_note("No architecture-weight history (search/arch_history.json is absent)."))
    elif r.arch_history.get("softmax"):
      g = r.genotype
      upper = [g.upper_name(u) for u in range(len(g.nodes) + len(g.cells))]
      seeds = list(r.arch_history.get("seeds") or [0])
      chosen = r.search_summary.get("chosen_seed", seeds[0])
      index = seeds.index(chosen) if chosen in seeds else 0
      plots.arch_weight_curves(
          r.arch_history, self.image(f"arch_weights_seed_{seeds[index]}.png",
                                     f"architecture weights, seed {seeds[index]} (chosen)"),
          upper, ops.step_op_pool(_cfg(self.config, "fidelity", "paper")), seed_index=index)
    self.add("### Evaluation")
    if r.evaluate_records:
      trained = not (r.evaluate.get("val_selected") or {}).get("val_held_out", True)
      plots.evaluate_curves(r.evaluate_records,
                            self.image("evaluate_curves.png", "evaluation curves"),
                            "Evaluation (searched genotype retrained)", self.label, trained)
    else:
      self.add(_note("No evaluation curves (evaluate/metrics.jsonl is absent)."))
    for b in r.baselines:
      if b["records"]:
        trained = not (b["result"] or {}).get("val_selected", {}).get("val_held_out", True)
        plots.evaluate_curves(b["records"],
                              self.image(f"{b['name']}_curves.png", f"{b['label']} curves"),
                              f"Baseline: {b['label']}", self.label, trained)

  def markdown(self) -> str:
    return "\n".join(self.parts)


def build_report(config, run: RunFiles, stage_dir: str) -> str:
  """Writes the CSVs and PNGs into `stage_dir`; returns the markdown text."""
  b = _Builder(config, run, stage_dir)
  b.header()
  b.winner()
  b.results()
  b.features()
  b.params()
  b.cost()
  b.ablations()
  b.agreement()
  b.decisions()
  b.genotype()
  b.curves()
  return b.markdown()


def _swap_in(stage_dir: str, report_dir: str, md_path: str, text: str) -> None:
  """Replaces `report_dir` by `stage_dir`, then report.md; restores the old folder on failure."""
  old_holder = tempfile.mkdtemp(dir=os.path.dirname(report_dir), prefix=".report-old-")
  old = os.path.join(old_holder, REPORT_DIR)
  had_old, moved = os.path.isdir(report_dir), False
  try:
    if had_old:
      os.rename(report_dir, old)
    os.rename(stage_dir, report_dir)
    moved = True
    write_text_atomic(md_path, text)
  except BaseException:
    if moved:
      shutil.rmtree(report_dir, ignore_errors=True)
    if had_old and os.path.isdir(old):
      os.rename(old, report_dir)
    raise
  finally:
    shutil.rmtree(old_holder, ignore_errors=True)


def write_report(config, workdir: str | os.PathLike) -> str:
  """Writes `workdir/report.md` and `workdir/report/` (CSVs, PNGs) from the stages' files.

  Everything is built in a staging folder first; only when every table and
  figure has been written are `report/` and `report.md` replaced (folder by
  rename, report.md by `write_text_atomic`), so a failure leaves an earlier
  report untouched. Optional inputs that are absent give a one-line note.

  Args:
    config: the experiment config (name, fidelity, model shapes for `describe`).
    workdir: the run directory.

  Returns:
    The path of report.md.

  Raises:
    DataError: the search or evaluate stage's files are missing or damaged, or the
      report cannot be written (disk full, read-only, no permission).
  """
  workdir = os.path.abspath(os.fspath(workdir))
  run = read_run(config, workdir)
  with disk_errors(os.path.join(workdir, REPORT_DIR)):
    stage_dir = tempfile.mkdtemp(dir=workdir, prefix=".report-new-")
  os.chmod(stage_dir, 0o755)           # mkdtemp makes it private; it becomes report/
  try:
    with disk_errors(os.path.join(workdir, REPORT_DIR)):
      text = build_report(config, run, stage_dir)
    with disk_errors(os.path.join(workdir, REPORT_MD)):
      _swap_in(stage_dir, os.path.join(workdir, REPORT_DIR), os.path.join(workdir, REPORT_MD),
               text)
  finally:
    shutil.rmtree(stage_dir, ignore_errors=True)
  return os.path.join(workdir, REPORT_MD)
