"""Stage 2: item text and image embeddings on Ray, written as WebDataset shards (DESIGN §1-2).

Local (starts a Ray instance on 127.0.0.1 unless RAY_ADDRESS is set; ``--executor local`` runs
without Ray)::

    python -m dprec.extract --dataset data/default --out data_shards/default/smollm2-mobilenet
    python -m dprec.extract --dataset data/default --text-model minilm --image-model none \\
        --out data_shards/default/minilm

On a cluster (``cluster/ray-cluster.yaml``; the runtime env keeps data_shards/, .venv/,
mlflow.db, mlruns/ and runs/ out of the upload)::

    ray job submit --address http://HEAD:8265 --working-dir . \\
        --runtime-env cluster/ray_job_runtime_env.yaml -- \\
        python -m dprec.extract --dataset data/default --text-model HuggingFaceTB/SmolLM2-1.7B-Instruct \\
        --image-model google/siglip-base-patch16-224 --text-actors 4 --image-actors 2 \\
        --out data_shards/default/smollm2-1.7b-siglip

Features from MMRec (``text_feat.npy`` / ``image_feat.npy``, row i = item index i)::

    python -m dprec.extract import-mmrec --dataset data/baby --text-feat baby/text_feat.npy \\
        --image-feat baby/image_feat.npy --out data_shards/baby/mmrec

A rerun with the same configuration computes only the shards the manifest does not list yet.
Progress goes to stdout line by line (``ray job logs``); the last line is one JSON summary:
items, shards written and skipped, failures by kind, seconds, items per second.
"""

from __future__ import annotations

import argparse
import sys

from dprec.features.image import ImageConfig
from dprec.features.pipeline import ExtractConfig, ExtractError, RunSummary, import_mmrec, run_extract
from dprec.features.shards import ShardError
from dprec.features.text import TextConfig, TextModelError


def _extract_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dprec.extract", description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", required=True, help="canonical dataset folder")
    p.add_argument("--out", required=True, help="feature folder, e.g. data_shards/<dataset>/<feature-set>")
    g = p.add_argument_group("text")
    g.add_argument("--text-model", default="smollm2", help="smollm2 | minilm | HF id | local folder | none")
    g.add_argument("--text-revision", default=None)
    g.add_argument("--pooling", default="auto", choices=("auto", "last", "mean"))
    g.add_argument(
        "--prompt-template",
        default=None,
        help="with {item}, {title} {brand} {categories} {description}, or attributes of items.extra",
    )
    g.add_argument("--max-length", type=int, default=None, help="tokens per item (default 512; minilm 256)")
    g.add_argument("--max-chars", type=int, default=20_000, help="characters kept per text field")
    g.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None, help="L2-normalise text vectors")
    g.add_argument("--text-batch-size", type=int, default=16)
    g.add_argument(
        "--text-max-padding",
        type=float,
        default=0.1,
        help="close a text batch early when padding would exceed this fraction of its tokens",
    )
    g.add_argument("--model-cache", default=None, help="cache for converted models (default ~/.cache/dprec/models)")
    g = p.add_argument_group("image")
    g.add_argument("--image-model", default="mobilenet_v2", help="mobilenet_v2 | .pth | HF id | local folder | none")
    g.add_argument("--image-revision", default=None)
    g.add_argument("--image-batch-size", type=int, default=16)
    g.add_argument("--fetch-urls", action="store_true", help="fetch image URLs (off: counted as image_url_not_fetched)")
    g.add_argument("--url-timeout", type=float, default=5.0)
    g = p.add_argument_group("models, both modalities")
    g.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="for --executor local")
    g.add_argument("--model-dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    g.add_argument("--trust-remote-code", action="store_true")
    g = p.add_argument_group("shards")
    g.add_argument("--items-per-shard", type=int, default=256)
    g.add_argument("--store-dtype", default="float32", choices=("float32", "float16"))
    g.add_argument("--overwrite", action="store_true", help="replace features of another configuration in --out")
    g = p.add_argument_group("execution")
    g.add_argument("--executor", default="ray", choices=("ray", "local"))
    g.add_argument("--address", default=None, help="Ray address (default RAY_ADDRESS, else a local instance)")
    g.add_argument("--include-dashboard", action="store_true", help="dashboard for the local Ray instance")
    g.add_argument("--text-actors", type=int, default=1)
    g.add_argument("--image-actors", type=int, default=1)
    g.add_argument("--cpus-per-actor", type=float, default=1.0)
    g.add_argument("--gpus-per-actor", type=float, default=None, help="default: share the cluster's GPUs, 0 without")
    g.add_argument("--torch-threads", type=int, default=None)
    g.add_argument("--max-restarts", type=int, default=3)
    g.add_argument("--max-task-retries", type=int, default=3)
    g.add_argument("--no-spread", action="store_true", help="let Ray pack actors instead of spreading them")
    return p


def _mmrec_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dprec.extract import-mmrec",
        description="MMRec text_feat.npy / image_feat.npy -> feature shards",
    )
    p.add_argument("--dataset", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--text-feat", default=None)
    p.add_argument("--image-feat", default=None)
    p.add_argument("--items-per-shard", type=int, default=256)
    p.add_argument("--store-dtype", default="float32", choices=("float32", "float16"))
    p.add_argument("--overwrite", action="store_true")
    return p


def config_from_args(a: argparse.Namespace) -> ExtractConfig:
    text = None
    if a.text_model != "none":
        text = TextConfig(
            model=a.text_model,
            revision=a.text_revision,
            pooling=a.pooling,
            prompt_template=a.prompt_template,
            max_length=a.max_length,
            max_chars=a.max_chars,
            normalize=a.normalize,
            batch_size=a.text_batch_size,
            max_padding=a.text_max_padding,
            dtype=a.model_dtype,
            device=a.device,
            trust_remote_code=a.trust_remote_code,
            cache_dir=a.model_cache,
        )
    image = None
    if a.image_model != "none":
        image = ImageConfig(
            model=a.image_model,
            revision=a.image_revision,
            batch_size=a.image_batch_size,
            dtype=a.model_dtype,
            device=a.device,
            trust_remote_code=a.trust_remote_code,
            fetch_urls=a.fetch_urls,
            url_timeout=a.url_timeout,
        )
    return ExtractConfig(
        dataset=a.dataset,
        out=a.out,
        text=text,
        image=image,
        items_per_shard=a.items_per_shard,
        store_dtype=a.store_dtype,
        executor=a.executor,
        address=a.address,
        include_dashboard=a.include_dashboard,
        text_actors=a.text_actors,
        image_actors=a.image_actors,
        cpus_per_actor=a.cpus_per_actor,
        gpus_per_actor=a.gpus_per_actor,
        torch_threads=a.torch_threads,
        max_restarts=a.max_restarts,
        max_task_retries=a.max_task_retries,
        spread=not a.no_spread,
        overwrite=a.overwrite,
    )


def main(argv: list[str] | None = None) -> RunSummary:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "import-mmrec":
            a = _mmrec_parser().parse_args(argv[1:])
            summary = import_mmrec(
                a.dataset, a.out, a.text_feat, a.image_feat, a.items_per_shard, a.store_dtype, a.overwrite
            )
        else:
            parser = _extract_parser()
            a = parser.parse_args(argv)
            try:
                cfg = config_from_args(a)
            except ValueError as exc:
                parser.error(str(exc))
            summary = run_extract(cfg)
    except (ExtractError, ShardError, TextModelError, ValueError) as exc:
        print(f"extract: error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from exc
    print(summary.line(), flush=True)
    return summary


if __name__ == "__main__":
    main()
