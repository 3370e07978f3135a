"""Workflow config validation: JSON Schema with defaults, then cross-references.

The Snakefile calls `validate_config` at load time, so a misspelt key or a wrong type stops
the workflow before any job runs, with a message that names the key.
"""

from __future__ import annotations

import copy
from pathlib import Path

import yaml
from jsonschema import Draft202012Validator, validators

from speculators.errors import SpeculatorsError

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "config" / "schema.yaml"
BUILTIN_DATASETS = ("chitchat", "sharegpt", "ultrachat")


def _with_defaults(validator_class):
    check_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, sub in properties.items():
                if "default" in sub and name not in instance:
                    instance[name] = copy.deepcopy(sub["default"])  # never share a default
        yield from check_properties(validator, properties, instance, schema)

    return validators.extend(validator_class, {"properties": set_defaults})


def load_schema(path: str | Path = SCHEMA_PATH) -> dict:
    return yaml.safe_load(Path(path).read_text())


def _key_path(error) -> str:
    parts = [str(p) for p in error.absolute_path]
    return ".".join(parts) if parts else "(top level)"


def _describe(error) -> str:
    """One readable line for a schema error, naming the offending key."""
    where = _key_path(error)
    if error.validator == "additionalProperties":
        extra = sorted(set(error.instance) - set(error.schema.get("properties", {})))
        if extra:
            return f"{'.'.join([where, extra[0]]) if where != '(top level)' else extra[0]}: unknown key"
    if error.validator == "required":
        return f"{where}: {error.message}"
    if error.validator == "oneOf" and where.startswith("models."):
        return f"{where}: give either `path` or both `gguf_package` and `gguf_file`"
    return f"{where}: {error.message}"


def validate_config(
    config: dict, schema_path: str | Path = SCHEMA_PATH, source: str = "config"
) -> dict:
    """Validate `config` in place (filling defaults) and return it; raise SpeculatorsError."""
    schema = load_schema(schema_path)
    validator = _with_defaults(Draft202012Validator)(schema)
    errors = sorted(
        validator.iter_errors(config),
        key=lambda e: (len(list(e.absolute_path)), str(e.absolute_path)),
    )
    if errors:
        # The deepest error is the most specific; oneOf/anyOf wrap their causes.
        err = errors[-1]
        while err.context and err.validator != "oneOf":
            err = max(err.context, key=lambda e: len(list(e.absolute_path)))
        raise SpeculatorsError(source, _describe(err))
    _check_references(config, source)
    return config


def _check_references(config: dict, source: str) -> None:
    for name, ds in config["datasets"].items():
        if ds.get("local_copy", "auto") != "auto" and ds["source"] != "sharegpt":
            raise SpeculatorsError(
                source,
                f"datasets.{name}.local_copy: only the sharegpt source has a local copy"
                f" (source is {ds['source']!r})",
            )
    for run_name, run in config["runs"].items():
        if run["target"] not in config["models"]:
            raise SpeculatorsError(
                source, f"runs.{run_name}.target: unknown model '{run['target']}' (not in models)"
            )
        for ds in run["datasets"]:
            if ds not in config["datasets"]:
                raise SpeculatorsError(
                    source, f"runs.{run_name}.datasets.{ds}: unknown dataset (not in datasets)"
                )
        layer_ids = run["hidden_states"]["layer_ids"]
        if layer_ids is not None and (
            len(set(layer_ids)) != len(layer_ids) or layer_ids != sorted(layer_ids)
        ):
            # vLLM feeds the aux states to the draft in ascending layer order.
            raise SpeculatorsError(
                source,
                f"runs.{run_name}.hidden_states.layer_ids: ids must be distinct and ascending",
            )
