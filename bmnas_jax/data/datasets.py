"""Dataset registry: `config.data.source` names -> dataset functions `get_dataset(config)`.

A name not listed here is read as an import path `package.module:function`, so a
dataset can live outside the package (see `bmnas_jax.data.source`).
"""

DATASETS: dict[str, str] = {
    "ego": "bmnas_jax.data.ego:get_dataset",
    "mfeat": "bmnas_jax.data.mfeat:get_dataset",
    "mmimdb": "bmnas_jax.data.mmimdb:get_dataset",
    "ntu": "bmnas_jax.data.ntu:get_dataset",
    "planted": "bmnas_jax.data.planted:get_dataset",
}
