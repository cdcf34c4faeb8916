"""Stage 2: item text and image embeddings on Ray, written as WebDataset shards (DESIGN §1-2).

Local (a Ray instance on 127.0.0.1 unless RAY_ADDRESS is set; ``--executor local``: no Ray)::

    python -m dprec.extract --dataset data/default --out data_shards/default/smollm2-mobilenet

On a cluster (``cluster/ray-cluster.yaml``; the runtime env keeps outputs and .venv/ out of the upload)::

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env cluster/ray_job_runtime_env.yaml -- \\
        python -m dprec.extract --dataset data/default --text-model HuggingFaceTB/SmolLM2-1.7B-Instruct \\
        --image-model google/siglip-base-patch16-224 --text-actors 4 --image-actors 2 --out data_shards/default/big

MMRec features: ``python -m dprec.extract import-mmrec --dataset data/baby --text-feat text_feat.npy
--out data_shards/baby/mmrec``. Per-item discrete codes (one-hot per level, :mod:`dprec.features.codes`):
``python -m dprec.extract import-codes --dataset data/instruments-random --codes Instruments.text_codes.json
Instruments.image_codes.json --modality text_codes image_codes --out data_shards/instruments/codes``.
Flags come from :mod:`dprec.features.config`. A rerun computes only the shards the manifest does not list; progress goes to stdout line by line (``ray job
logs``), the last line is one JSON summary. ``main`` returns 0, or 2 with the error on stderr as one
``extract: error: ...`` line (the user's mistakes, OS errors included, never as a traceback).
"""

from __future__ import annotations

import argparse
import sys

from dprec.config import DPRecError, add_arguments, args_dict, from_args, from_dict, run_stage
from dprec.features.config import CodesImportConfig, ExtractConfig, ImageConfig, MMRecImportConfig, TextConfig
from dprec.features.hf import one_line
from dprec.features.pipeline import ExtractError, import_mmrec, run_extract
from dprec.io import log_to_console

TEXT, IMAGE = "text_", "image_"  # flag prefixes of the two modalities' configs


def _extract_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dprec.extract", description=__doc__.split("\n\n")[0])
    add_arguments(p, ExtractConfig, title="extraction")
    add_arguments(p, TextConfig, prefix=TEXT, title="text (--text-model none: no text)")
    add_arguments(p, ImageConfig, prefix=IMAGE, title="image (--image-model none: no image)")
    return p


def _mmrec_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dprec.extract import-mmrec", description=MMRecImportConfig.__doc__)
    add_arguments(p, MMRecImportConfig)
    return p


def _codes_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dprec.extract import-codes", description=CodesImportConfig.__doc__)
    add_arguments(p, CodesImportConfig)
    return p


def config_from_args(args: argparse.Namespace) -> ExtractConfig:
    """The run the flags describe; a modality whose model is ``none`` is left out."""
    modalities = {}
    for name, cls, prefix in (("text", TextConfig, TEXT), ("image", ImageConfig, IMAGE)):
        given = args_dict(cls, args, prefix)
        modalities[name] = None if given.get("model") == "none" else from_dict(cls, given, f"{name} flags")
    return from_dict(ExtractConfig, {**args_dict(ExtractConfig, args), **modalities}, "command line")


def main(argv: list[str] | None = None) -> int:
    """Run extraction (or ``import-mmrec`` / ``import-codes``) as ``argv`` says; 0 on success, 2 on failure."""
    argv = list(sys.argv[1:] if argv is None else argv)
    log_to_console()

    def body() -> int:
        try:
            if argv[:1] == ["import-mmrec"]:
                summary = import_mmrec(from_args(MMRecImportConfig, _mmrec_parser().parse_args(argv[1:])))
            elif argv[:1] == ["import-codes"]:
                from dprec.features.codes import import_codes

                summary = import_codes(from_args(CodesImportConfig, _codes_parser().parse_args(argv[1:])))
            else:
                summary = run_extract(config_from_args(_extract_parser().parse_args(argv)))
        except DPRecError as exc:  # a message from a library (a model's loader, Ray) may span lines: one line
            if "\n" not in str(exc):
                raise
            raise ExtractError(one_line(exc, 1000)) from exc
        print(summary.line(), flush=True)
        return 0

    return run_stage("extract", body)


if __name__ == "__main__":
    raise SystemExit(main())
