"""FlowAR exports on the Hugging Face Hub, and their model card.

An export folder is one Hub model repository, file for file:

    config.json        {"format": "flowar/1", "model": {...}, "training": {...}}: the model
    model.safetensors  its weights (a training export's are the EMA weights)
    ema.safetensors    optional, EMA weights beside the model's
    latents.json       the latent dataset's metadata: the VAE that decodes the latents, resolution, scales
    sampler.json       optional: the best sampler setting of a `flowar evaluate` grid
    evaluation.json    optional: the evaluation results the card shows
    README.md          the model card, rendered from the JSON files above (so it never disagrees)

    FlowAR.from_pretrained("org/name")            # resolve_export: a hub id through the Hub cache
    model.push_to_hub("org/name")                 # save_pretrained into a temporary folder, then push_export
    push_export("runs/x/export", "org/name")      # an export folder as it is on disk
    write_model_card("runs/x/export", results={"fid": 3.1}, details={"num_samples": 50000})

A string that is an existing path is always local, as before; a string that is not and reads
`namespace/name` is a hub id. The Hub library loads lazily, so `import flowar` stays light.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .config import ConfigError

CONFIG_FILE, WEIGHTS_FILE, EMA_FILE = "config.json", "model.safetensors", "ema.safetensors"
LATENTS_FILE, SAMPLER_FILE, EVALUATION_FILE, CARD_FILE = ("latents.json", "sampler.json",
                                                          "evaluation.json", "README.md")
# The JSON files beside the weights that a loaded model carries and save_pretrained writes back.
COMPANION_FILES = (LATENTS_FILE, SAMPLER_FILE, EVALUATION_FILE)
# Files that describe the model without defining it (evaluation resumption may ignore them).
DESCRIPTIVE_FILES = (CARD_FILE, EVALUATION_FILE, SAMPLER_FILE)
EXPORT_FILES = (CONFIG_FILE, WEIGHTS_FILE, EMA_FILE, *COMPANION_FILES, CARD_FILE)
LIBRARY_NAME = "flowar"
TAGS = ["flowar", "image-generation", "class-conditional"]
PAPER = "https://arxiv.org/abs/2412.15205"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")  # namespace/name

__all__ = ["ExportInfo", "looks_like_hub_id", "resolve_export", "read_export_info",
           "write_companions", "write_model_card", "model_card", "push_export", "check_repo_id",
           "check_export_folder"]


@dataclass
class ExportInfo:
    """What `FlowAR.from_pretrained` read besides the weights: what it was asked for (`source`),
    the local folder it read (a Hub cache snapshot for a hub id), config.json's entries other than
    the model (e.g. "training") and the companion JSON files' text, kept verbatim."""
    source: str
    folder: Path
    extra: dict = field(default_factory=dict)
    companions: dict[str, str] = field(default_factory=dict)


def looks_like_hub_id(name) -> bool:
    """A str that is no existing path and reads namespace/name (a Path is always local)."""
    return isinstance(name, str) and _HUB_ID.fullmatch(name) is not None and not os.path.exists(name)


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------

def resolve_export(name_or_path, *, revision: str | None = None, cache_dir=None, token=None,
                   subfolder: str = "", local_files_only: bool = False,
                   force_download: bool = False) -> Path:
    """The local folder of an export: a path as it is, or a hub id's snapshot in the Hub cache
    (only the export's files are fetched; with HF_HUB_OFFLINE=1 only the cache is read)."""
    sub = subfolder.strip("/")
    if not looks_like_hub_id(name_or_path):
        if revision is not None:
            raise ConfigError(f"FlowAR model {str(name_or_path)!r}: revision={revision!r} applies to "
                              "hub ids (org/name); this is a local path")
        return Path(name_or_path) / sub if sub else Path(name_or_path)
    return _snapshot(name_or_path, sub, revision=revision, cache_dir=cache_dir, token=token,
                     local_files_only=local_files_only, force_download=force_download)


def _snapshot(repo_id: str, sub: str, *, revision, cache_dir, token, local_files_only,
              force_download) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.utils import (HFValidationError, LocalEntryNotFoundError,
                                       RepositoryNotFoundError, RevisionNotFoundError)

    offline = bool(constants.HF_HUB_OFFLINE)
    what = f"FlowAR model {repo_id!r}" + (f" (revision {revision!r})" if revision else "")
    cache = Path(cache_dir or constants.HF_HUB_CACHE)
    patterns = [f"{sub}/{name}" if sub else name for name in EXPORT_FILES]
    try:  # offline: read the cache without trying the network first
        folder = snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, token=token,
                                   allow_patterns=patterns, force_download=force_download,
                                   local_files_only=local_files_only or offline)
    except LocalEntryNotFoundError:
        why = ("HF_HUB_OFFLINE is set" if offline else "local_files_only=True" if local_files_only
               else "the Hub cannot be reached")
        raise FileNotFoundError(
            f"{what}: no such local folder, and as a hub id it is not in the Hub cache ({cache}) "
            f"while {why}; download it once with network access, or give an export folder") from None
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise FileNotFoundError(f"{what}: no such local folder, and not found on the Hub "
                                f"({type(e).__name__}: {str(e).splitlines()[0]})") from None
    except HFValidationError as e:
        raise ConfigError(f"{what}: no such local folder, and not a valid hub id ({e})") from None
    except OSError as e:  # network errors, HTTP errors (HfHubHTTPError is an OSError)
        raise OSError(f"{what}: cannot be fetched from the Hub ({type(e).__name__}: {e})") from None
    return Path(folder) / sub if sub else Path(folder)


def describe(name_or_path, folder: Path) -> str:
    """How messages name an export: the folder for a local path, else the hub id and its snapshot."""
    return str(folder) if not looks_like_hub_id(name_or_path) else f"{name_or_path} (Hub cache {folder})"


def read_export_info(name_or_path, folder: Path, meta: dict) -> ExportInfo:
    """config.json's non-model entries and the companion files' text, for save_pretrained to
    write back: a loaded export re-saved or pushed keeps its training link, VAE and results.
    Kept as text, so a file this version cannot parse never stops a model from loading."""
    companions = {}
    for name in COMPANION_FILES:
        p = folder / name
        if p.is_file():
            companions[name] = p.read_text(encoding="utf-8", errors="replace")
    extra = {k: v for k, v in meta.items() if k not in ("format", "model")}
    return ExportInfo(source=str(name_or_path), folder=folder, extra=extra, companions=companions)


# ------------------------------------------------------------------------------------------------
# Writing: companions and the model card
# ------------------------------------------------------------------------------------------------

def write_companions(folder: Path, carried: dict[str, str] | None = None, *,
                     latents: dict | None = None, results: dict | None = None,
                     details: dict | None = None) -> None:
    """The companion JSON files: those a loaded model carried, replaced by `latents` (the latent
    dataset's metadata) and `results` (+ `details`: how they were measured) when given."""
    texts = dict(carried or {})
    if latents is not None:
        texts[LATENTS_FILE] = json.dumps(latents, indent=1, default=str)
    if results is not None:
        texts[EVALUATION_FILE] = _evaluation_text(results, details)
    for name, text in texts.items():
        (Path(folder) / name).write_text(text, encoding="utf-8")


def _evaluation_text(results: dict, details: dict | None) -> str:
    if not isinstance(results, dict):
        raise ConfigError(f"results must be a dict of metric name -> value, not {type(results).__name__}")
    if details is not None and not isinstance(details, dict):
        raise ConfigError(f"details must be a dict, not {type(details).__name__}")
    return json.dumps({"results": results, "details": details or {}}, indent=1, default=str)


def write_model_card(folder, results: dict | None = None, details: dict | None = None, *,
                     repo_id: str | None = None) -> Path:
    """(Re)write README.md of an export folder from its files. With `results` (metric -> number
    or text, as `flowar evaluate` reports them) and optional `details` (sampler, sample count,
    reference, run id...), evaluation.json is (re)written first; without, the card keeps the
    results already there. `repo_id` names the repository in the card's loading snippet."""
    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{folder} is not a FlowAR export: {CONFIG_FILE} is missing")
    if results is not None:
        (folder / EVALUATION_FILE).write_text(_evaluation_text(results, details), encoding="utf-8")
    model_card(folder, repo_id).save(folder / CARD_FILE)
    return folder / CARD_FILE


def model_card(folder, repo_id: str | None = None):
    """The huggingface_hub ModelCard of an export folder (metadata: library, tags, and the
    numeric results as model-index entries; body: the config, data, training run, results)."""
    from huggingface_hub import ModelCard, ModelCardData

    folder = Path(folder)
    files = {name: _read_json(folder / name) for name in (CONFIG_FILE, *COMPANION_FILES)}
    name = repo_id or "flowar"
    results = _eval_results(files, name)
    data = ModelCardData(library_name=LIBRARY_NAME, tags=list(TAGS), model_name=name if results else None,
                         eval_results=results or None)
    body = _render_body(folder, files, repo_id)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def _read_json(path: Path):
    """The JSON in `path`; None when the file is absent; {"_unreadable": why} when it is broken
    (the card says so instead of failing)."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return {"_unreadable": f"{path.name} is not valid JSON ({e})"}


def _obj(value) -> dict:
    return value if isinstance(value, dict) else {}


def _render_body(folder: Path, files: dict, repo_id: str | None) -> str:
    config = _obj(files[CONFIG_FILE])
    model = _obj(config.get("model"))
    sections = [_intro(model, _obj(files[LATENTS_FILE]), repo_id or "path/to/this/folder"),
                "## Model\n\n" + _table([("parameters", _parameter_count(folder)),
                                         ("format", config.get("format")), *model.items()]),
                _data_section(files[LATENTS_FILE])]
    sections += [_extra_section(key, value) for key, value in config.items()
                 if key not in ("format", "model")]
    sections += [_evaluation_section(files[EVALUATION_FILE]), _sampler_section(files[SAMPLER_FILE]),
                 _files_section(folder)]
    return "\n\n".join(s for s in sections if s) + "\n"


def _intro(model: dict, latents: dict, where: str) -> str:
    facts = [f"{model['num_classes']} classes" if model.get("num_classes") else "",
             f"{latents['resolution']} px images" if latents.get("resolution") else "",
             f"latent scales {_fmt(model['scales'])}" if model.get("scales") else ""]
    facts = ", ".join(f for f in facts if f)
    return (f"# FlowAR model\n\nA class-conditional image generator with the [FlowAR]({PAPER}) "
            "architecture (scale-wise autoregression whose semantics condition a flow-matching "
            f"net){': ' + facts if facts else ''}. Written by flowar; load it with\n\n"
            "```python\nimport torch\nfrom flowar import FlowAR\n\n"
            f'model = FlowAR.from_pretrained("{where}")\n'
            "latents = model.generate(torch.tensor([0, 1]))  # normalised latents, coarse to fine\n"
            "```\n\nThe latents decode with the VAE that `latents.json` names (Data, below).")


def _data_section(latents) -> str:
    if latents is None:
        return "## Data\n\nNo `latents.json`: the VAE that decodes this model's latents is not recorded."
    latents = _obj(latents)
    if "_unreadable" in latents:
        return f"## Data\n\n{latents['_unreadable']}"
    vae = _obj(latents.get("vae"))
    vae_id = str(vae.get("id", ""))
    local = vae_id and _HUB_ID.fullmatch(vae_id.partition(":")[0]) is None
    note = ("\n\nThe VAE is named by a local path of the machine that encoded the data: elsewhere, "
            "give the VAE explicitly (`--vae`); its `sha256` identifies the weights." if local else "")
    names = latents.get("class_names") or []
    rest = [(k, v) for k, v in latents.items() if k not in ("vae", "class_names")]
    if names:
        rest.append(("class_names", f"{len(names)}: {', '.join(map(str, names[:8]))}"
                                    f"{', ...' if len(names) > 8 else ''}"))
    return ("## Data\n\nThe latent dataset the model was trained on (`latents.json`).\n\nVAE:\n\n"
            + _table(vae.items()) + note + "\n\nLatents:\n\n" + _table(rest))


def _extra_section(key: str, value) -> str:
    title = {"training": "Training run", "imported": "Imported from"}.get(key, key)
    if key == "training" and isinstance(value, dict) and value.get("mlflow_run_id"):
        lead = f"MLflow run `{value['mlflow_run_id']}`, step {value.get('step', '?')}.\n\n"
    else:
        lead = ""
    return f"## {title}\n\n{lead}" + (_table(value.items()) if isinstance(value, dict) else _fmt(value))


def _evaluation_section(evaluation) -> str:
    if evaluation is None:
        return ("## Evaluation\n\nNo results yet. `flowar evaluate` measures them; "
                "`flowar.hub.write_model_card(folder, results)` puts them here.")
    evaluation = _obj(evaluation)
    if "_unreadable" in evaluation:
        return f"## Evaluation\n\n{evaluation['_unreadable']}"
    text = "## Evaluation\n\n" + _table(_obj(evaluation.get("results")).items(), ("metric", "value"))
    details = _obj(evaluation.get("details"))
    return text + ("\n\nMeasured with:\n\n" + _table(details.items()) if details else "")


def _sampler_section(sampler) -> str:
    sampler = _obj(sampler)
    if not isinstance(sampler.get("sampler"), dict):
        return ""
    fid = f" (FID {_fmt(sampler['fid'])})" if sampler.get("fid") is not None else ""
    return (f"## Recommended sampler\n\nThe best setting of a sampler grid{fid}, `sampler.json`:\n\n"
            + _table(sampler["sampler"].items()))


def _files_section(folder: Path) -> str:
    names = sorted(p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    rows = [(n, f"{(folder / n).stat().st_size:,} bytes") for n in names if n != CARD_FILE]
    return "## Files\n\n" + _table(rows + [(CARD_FILE, "this card")], ("file", "size"))


def _parameter_count(folder: Path):
    """Counted from the safetensors header: no tensor is read."""
    from safetensors import safe_open

    try:
        with safe_open(str(folder / WEIGHTS_FILE), framework="pt") as f:
            total = 0
            for key in f.keys():
                n = 1
                for d in f.get_slice(key).get_shape():
                    n *= d
                total += n
        return f"{total:,}"
    except Exception as e:  # a card is still written for a folder whose weights are unreadable
        return f"unknown ({type(e).__name__})"


def _eval_results(files: dict, model_name: str) -> list:
    """The numeric results as Hub model-index entries (text results stay in the card's table)."""
    from huggingface_hub import EvalResult

    evaluation = _obj(files[EVALUATION_FILE])
    dataset = _dataset_name(files, _obj(evaluation.get("details")))
    return [EvalResult(task_type="image-generation", task_name="Class-conditional image generation",
                       dataset_type=dataset, dataset_name=dataset, metric_type=k, metric_name=k,
                       metric_value=float(v))
            for k, v in _obj(evaluation.get("results")).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]


def _dataset_name(files: dict, details: dict) -> str:
    reference = details.get("reference") or details.get("dataset")
    if isinstance(reference, str) and reference:
        return reference
    training = _obj(_obj(files[CONFIG_FILE]).get("training"))
    source = _obj(_obj(files[LATENTS_FILE]).get("source"))
    for path in (training.get("dataset"), source.get("path")):
        if isinstance(path, str) and path.strip("/"):
            return os.path.basename(path.rstrip("/"))
    return "unknown"


def _fmt(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)) and all(not isinstance(v, (list, dict)) for v in value):
        return ", ".join(_fmt(v) for v in value) or "—"
    if isinstance(value, (dict, list)):
        return json.dumps(value, default=str)
    return str(value)


def _table(rows, header=("key", "value")) -> str:
    """A two-column Markdown table; cell text cannot break the table (pipes, newlines)."""
    clean = lambda v: _fmt(v).replace("|", "\\|").replace("\n", " ")
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    lines += [f"| {clean(k)} | {clean(v)} |" for k, v in rows]
    return "\n".join(lines) if len(lines) > 2 else "(none)"


# ------------------------------------------------------------------------------------------------
# Publishing
# ------------------------------------------------------------------------------------------------

def push_export(folder, repo_id: str, *, token: str | None = None, private: bool | None = None,
                branch: str | None = None, commit_message: str | None = None,
                create_pr: bool = False, write_card: bool = True) -> str:
    """Upload an export folder, every file in it, to the Hub model repo `repo_id` (created if
    missing) in one commit; returns the commit URL. The folder is checked first, and with
    `write_card` its README.md is rewritten to name `repo_id` (the results it has are kept)."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    check_export_folder(folder)
    check_repo_id(repo_id)
    if write_card:
        write_model_card(folder, repo_id=repo_id)
    api = HfApi(token=token)
    repo = api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
    return api.upload_folder(repo_id=repo.repo_id, repo_type="model", folder_path=folder,
                             revision=branch, create_pr=create_pr,
                             commit_message=commit_message or "Upload FlowAR export with flowar")


def check_repo_id(repo_id) -> None:
    """Refuse what the Hub would refuse as a model repo id, naming it (before any upload)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        if not isinstance(repo_id, str) or "/" not in repo_id:
            raise HFValidationError("expected namespace/name")
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ConfigError(f"repo_id {repo_id!r} is not a Hub repo id such as org/name ({e})") from None


def check_export_folder(folder: Path) -> None:
    """Refuse a folder that FlowAR.from_pretrained could not load back (before any upload)."""
    from .model import FORMAT

    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder} is not a FlowAR export: {name} is missing")
    meta = _read_json(folder / CONFIG_FILE)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("_unreadable") or meta.get("format") if isinstance(meta, dict) else meta
        raise ConfigError(f"{folder / CONFIG_FILE}: not a FlowAR export config (format {found!r}, "
                          f"expected {FORMAT!r})")
