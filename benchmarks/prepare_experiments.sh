#!/usr/bin/env bash
# Datasets and feature sets of the experiment grids (benchmarks/grids/*.yaml), from ../shared/data.
#   bash benchmarks/prepare_experiments.sh [ml100k] [sports] [scientific] [instruments] [default] [scientific_llm]
#       [sports_llm] [cold]   (default: all)
# Writes data/<name>/ and data_shards/<catalogue>/<feature-set>/; a rerun skips finished work
# (complete shards are kept). Each catalogue's features serve all its splits (items hash), the cold-items
# splits of the cold-start grid (benchmarks/grids/cold-start.yaml) included.
# THREADS (default 2) and EXECUTOR (ray or local, default ray) set the extraction's torch threads and executor.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${DPREC_SHARED_DATA:-../shared/data}
PY=${PYTHON:-.venv/bin/python}
export HF_HUB_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0 MLFLOW_DISABLE_TELEMETRY=true
THREADS=${THREADS:-2}
EXTRACT=("$PY" -m dprec.extract --image-model none --text-actors 1 --cpus-per-actor "$THREADS" --torch-threads "$THREADS"
  --executor "${EXECUTOR:-ray}")

# one prompt per view; LLM prompts end PromptEOL-style so that the last token summarises the item
LLM_A=$'This movie: "Title: {title}\nDescription: {description}" means in one word:"'
LLM_B=$'This movie: "Genres: {categories}\nYear: {release_year}\nDirector: {director}\nCast: {cast}" means in one word:"'
ENC_A=$'Title: {title}\nDescription: {description}'
ENC_B=$'Genres: {categories}\nYear: {release_year}\nDirector: {director}\nCast: {cast}'
# every standard text field, labelled, in prompt order (title, brand, categories, description); empty ones left out
ENC_ITEM='{item}'
LLM_ITEM=$'This product: "{item}" means in one word:"'

ml100k() {
  for split in random chrono; do
    [ -f "data/ml-100k-$split/dataset.json" ] || "$PY" -m dprec.prepare table --preset ml-100k \
      --root "$SHARED/ml-100k" --out "data/ml-100k-$split" --split "$split" --seed 0
  done
  "${EXTRACT[@]}" --dataset data/ml-100k-random --out data_shards/ml-100k/smollm2-a --text-model smollm2 --prompt-template "$LLM_A"
  "${EXTRACT[@]}" --dataset data/ml-100k-random --out data_shards/ml-100k/smollm2-b --text-model smollm2 --prompt-template "$LLM_B"
  "${EXTRACT[@]}" --dataset data/ml-100k-random --out data_shards/ml-100k/minilm-a --text-model minilm --prompt-template "$ENC_A"
  "${EXTRACT[@]}" --dataset data/ml-100k-random --out data_shards/ml-100k/minilm-b --text-model minilm --prompt-template "$ENC_B"
}

default() {
  # the embedded default catalogue (text + PNG images); SmolLM2 text and MobileNetV2 image modalities, as the demo
  [ -f data/default/dataset.json ] || "$PY" -m dprec.prepare synthetic --out data/default
  "$PY" -m dprec.extract --dataset data/default --out data_shards/default/smollm2-mobilenet --text-model smollm2 \
    --image-model mobilenet_v2 --text-actors 1 --image-actors 1 --cpus-per-actor 1 --torch-threads 1
}

sports() {
  for split in chrono random; do
    [ -f "data/sports-$split/dataset.json" ] || "$PY" -m dprec.prepare mmrec "$SHARED/amazon-sports" \
      --user-sequence "$SHARED/amazon-sports/user_sequence.txt" --item-keywords "$SHARED/amazon-sports/item_keywords.txt" \
      --out "data/sports-$split" --split "$split" --seed 0
  done
  # the reader puts the keywords into the description as "Keywords: rack, fenders, ..."
  "${EXTRACT[@]}" --dataset data/sports-chrono --out data_shards/sports/smollm2-kw --text-model smollm2 \
    --items-per-shard 1024 --prompt-template 'This product: "{description}" means in one word:"'
  # the same interactions with real item text (item_text.tsv: the short title; the brand and category path as
  # categories) beside the keywords: another catalogue, so its own datasets and feature folder
  for split in given chrono random; do
    [ -f "data/sports-text-$split/dataset.json" ] || "$PY" -m dprec.prepare mmrec "$SHARED/amazon-sports" \
      --user-sequence "$SHARED/amazon-sports/user_sequence.txt" --item-text "$SHARED/amazon-sports/item_text.tsv" \
      --item-keywords "$SHARED/amazon-sports/item_keywords.txt" --out "data/sports-text-$split" --split "$split" --seed 0
  done
  "${EXTRACT[@]}" --dataset data/sports-text-chrono --out data_shards/sports-text/minilm --text-model minilm \
    --items-per-shard 1024 --prompt-template "$ENC_ITEM"
}

scientific() {
  # Industrial and Scientific (LC-Rec layout): full item text; each user's list is in time order (position = time)
  for split in random chrono; do
    [ -f "data/scientific-$split/dataset.json" ] || "$PY" -m dprec.prepare sequence \
      --interactions "$SHARED/amazon-scientific/Scientific.inter.json" \
      --items "$SHARED/amazon-scientific/Scientific.item.json" --out "data/scientific-$split" --split "$split" --seed 0
  done
  "${EXTRACT[@]}" --dataset data/scientific-random --out data_shards/scientific/minilm --text-model minilm \
    --prompt-template "$ENC_ITEM"
}

# the same item text through SmolLM2 (PromptEOL, last token): the LLM feature sets beside MiniLM's
scientific_llm() {
  scientific
  "${EXTRACT[@]}" --dataset data/scientific-random --out data_shards/scientific/smollm2 --text-model smollm2 \
    --prompt-template "$LLM_ITEM"
}

sports_llm() {
  sports
  "${EXTRACT[@]}" --dataset data/sports-text-chrono --out data_shards/sports-text/smollm2 --text-model smollm2 \
    --items-per-shard 1024 --prompt-template "$LLM_ITEM"
}

instruments() {
  # Musical Instruments: no item text; item and user ASINs through the ID maps
  for split in random chrono; do
    [ -f "data/instruments-$split/dataset.json" ] || "$PY" -m dprec.prepare sequence \
      --interactions "$SHARED/amazon-instruments/Instruments.inter.json" \
      --item-ids "$SHARED/amazon-instruments/Instruments.item2id" \
      --user-ids "$SHARED/amazon-instruments/Instruments.user2id" --out "data/instruments-$split" --split "$split" --seed 0
  done
  # text and image codes, one-hot per level (4 levels x 256 values = 1,024-d each), joined through the item map
  # prepare recorded; two modalities of one folder (#text_codes, #image_codes); 0/1 are exact in float16
  "$PY" -m dprec.extract import-codes --dataset data/instruments-random --out data_shards/instruments/codes \
    --codes "$SHARED/amazon-instruments/Instruments.text_codes.json" "$SHARED/amazon-instruments/Instruments.image_codes.json" \
    --modality text_codes image_codes --store-dtype float16
}

# cold-items splits (20 % of the items held out of training, seed 0) of the three sparse catalogues with real content;
# their features are the catalogues' own (the same items hash as the random and chrono splits)
cold() {
  scientific
  [ -f data/scientific-cold/dataset.json ] || "$PY" -m dprec.prepare sequence \
    --interactions "$SHARED/amazon-scientific/Scientific.inter.json" \
    --items "$SHARED/amazon-scientific/Scientific.item.json" --out data/scientific-cold --split cold-items --seed 0
  instruments
  [ -f data/instruments-cold/dataset.json ] || "$PY" -m dprec.prepare sequence \
    --interactions "$SHARED/amazon-instruments/Instruments.inter.json" \
    --item-ids "$SHARED/amazon-instruments/Instruments.item2id" \
    --user-ids "$SHARED/amazon-instruments/Instruments.user2id" --out data/instruments-cold --split cold-items --seed 0
  [ -f data/sports-text-cold/dataset.json ] || "$PY" -m dprec.prepare mmrec "$SHARED/amazon-sports" \
    --user-sequence "$SHARED/amazon-sports/user_sequence.txt" --item-text "$SHARED/amazon-sports/item_text.tsv" \
    --item-keywords "$SHARED/amazon-sports/item_keywords.txt" --out data/sports-text-cold --split cold-items --seed 0
  "${EXTRACT[@]}" --dataset data/sports-text-cold --out data_shards/sports-text/minilm --text-model minilm \
    --items-per-shard 1024 --prompt-template "$ENC_ITEM"
}

for target in "${@:-ml100k sports scientific instruments default scientific_llm sports_llm cold}"; do
  for t in $target; do "$t"; done
done
