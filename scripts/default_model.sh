#!/usr/bin/env bash
# The bundled default model and the scratch-vs-SSL comparison behind it (Resources/Models/demo/REPRODUCE.md).
#   scripts/default_model.sh data              # synthetic training + validation sets, SSL volume folder
#   scripts/default_model.sh pretrain          # masked SSL on every unlabeled volume at hand
#   scripts/default_model.sh finetune ARM SEED # ARM: scratch | ssl | demo | demo3 ... demo8; writes runs/default-ARM-sSEED
#       demo: a curriculum, continuing from the one-scan demo model (real scan only, 900 steps; the card in
#       Resources/Models/demo at commit d30a54f, weights sha256 a7ba98d1...) at half the learning rate
#       demo3: stage 3 of that curriculum, continuing from default-demo-s0 with 60 more synthetic CTs (seed 2),
#       on NPROC=2 torchrun ranks (one core each), 12 epochs at a quarter of the learning rate
#       demo4: stage 3 as demo3, but its 60 new synthetic CTs (seed 3) have organs grown or shrunk (spleen x0.8-1.5,
#       ...) and half of them are thin slabs: organ sizes other than the one source patient's
#       demo5: stage 3 as demo3, but its 60 new synthetic CTs (seed 5) come from the sample's MR slab of ANOTHER
#       patient (its TotalSegmentator total_mr map, synthesised as CT: a second anatomy); 10 epochs
#       demo6: stage 3 as demo3, but its second synthetic set (seed 2, the same cases) has veins drawn inside the
#       liver at the contrast phase's vein HU in 80% of cases (--vessel-prob 0.8): the source CT is native, so the
#       model never saw enhanced hepatic veins
#       demo7: stage 3 as demo3 (the same data), but half of the crops are cut to a thin axial slab (30-60 mm,
#       --slab-prob 0.5): a 40 mm slab of scans the model segments whole lost most of their spleen
#       (scripts/slab_check.py); 10 epochs. STAGE2=runs/stage2-demo starts it from stage 2 as committed (c64c9b5)
#       demo8: stage 3 as demo3 plus 20 synthetic CTs of the MR patient's anatomy (1 case in 8: demo5's half cost
#       the training anatomy), 8 epochs
#   scripts/default_model.sh postprocess ARM SEED # per organ, keep only the largest component where that raises
#                                              # Dice on both synthetic validation sets (written into the card)
#   scripts/default_model.sh evaluate ARM SEED # logonet segment + evaluate on the unseen DICOM series and the
#                                              # training scan (after training: never feeds back into it)
#   scripts/default_model.sh synthval MODEL [SET] # mean Dice of a model card on a synthetic validation set
#                                              # (default-synth-val, or default-synth-val2 with resized organs): the
#                                              # selection figure; same segment + evaluate as for real scans
#   scripts/default_model.sh slabcheck MODEL   # mean Dice on 40 mm slabs of the 12 synthetic validation CTs (and the
#                                              # training scan), next to the whole-scan prediction (scripts/slab_check.py)
#   scripts/default_model.sh table             # both arms' per-organ tables (markdown) from those CSVs
# Every stage is resumable: run the same line again after an interruption.
# Never trained on nor used to choose anything: the sample's DICOM series and aorta_report scan (the unseen
# test scans); only the evaluate stage reads the DICOM series, after training, to report it.
set -euo pipefail
cd "$(dirname "$0")/.."
LOGONET=${LOGONET:-.venv/bin/logonet}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
RUNS=${RUNS:-runs}
COMMON=(--model logonet --preset T --spacing 3 --roi 64 --samples 2 --crop-by classes --batch 1
        --overlap 0.25 --amp bf16 --grad-clip 12 --progress jsonl)

launch() {  # the logonet command, on NPROC torchrun ranks (gloo, one thread each) when NPROC > 1
  if [ "${NPROC:-1}" -gt 1 ]; then
    ${PYTHON:-.venv/bin/python} -m torch.distributed.run --standalone --nnodes=1 --nproc_per_node="$NPROC" -m logonet "$@"
  else
    $LOGONET "$@"
  fi
}

case "${1:-}" in
  data)
    if [ ! -f "$RUNS/stage1-demo/model.json" ]; then  # stage 1 of the demo arm: the one-scan model (REPRODUCE.md)
      mkdir -p "$RUNS/stage1-demo"
      git archive d30a54f Resources/Models/demo | tar -x --strip-components=3 -C "$RUNS/stage1-demo"
    fi
    if [ ! -f "$RUNS/stage2-demo/model.json" ]; then  # stage 2 as bundled at c64c9b5 (run default-demo-s0's card)
      mkdir -p "$RUNS/stage2-demo"
      git archive c64c9b5 Resources/Models/demo | tar -x --strip-components=3 -C "$RUNS/stage2-demo"
    fi
    $LOGONET demo --prepare-data "$RUNS/default-real"                      # the sample CT, BTCV labels
    [ -f "$RUNS/default-synth/dataset.json" ] || $LOGONET synth sample "$RUNS/default-synth" --cases 60 --seed 0
    [ -f "$RUNS/default-synth2/dataset.json" ] || $LOGONET synth sample "$RUNS/default-synth2" --cases 60 --seed 2
    [ -f "$RUNS/default-synth3/dataset.json" ] || $LOGONET synth sample "$RUNS/default-synth3" --cases 60 --seed 3 \
      --organ-resize-prob 0.5 --slab-prob 0.5
    [ -f "$RUNS/default-synth-mr/dataset.json" ] || $LOGONET synth sample-mr "$RUNS/default-synth-mr" --cases 60 \
      --seed 5
    [ -f "$RUNS/default-synth-mr20/dataset.json" ] || $LOGONET synth sample-mr "$RUNS/default-synth-mr20" --cases 20 \
      --seed 5  # the first 20 of default-synth-mr's cases: a second anatomy at a small share (demo8)
    [ -f "$RUNS/default-synth-veins/dataset.json" ] || $LOGONET synth sample "$RUNS/default-synth-veins" --cases 60 \
      --seed 2 --vessel-prob 0.8
    [ -f "$RUNS/default-synth-val/dataset.json" ] || $LOGONET synth sample "$RUNS/default-synth-val" --cases 6 --seed 1
    # a second selection set with resized organs, to choose between stage-3 arms (never trained on)
    [ -f "$RUNS/default-synth-val2/dataset.json" ] || $LOGONET synth sample "$RUNS/default-synth-val2" --cases 6 \
      --seed 4 --organ-resize-prob 0.5
    # synthetic CTs of the MR patient's anatomy: reported, not a selection set (demo5 trains on that anatomy)
    [ -f "$RUNS/default-synth-valmr/dataset.json" ] || $LOGONET synth sample-mr "$RUNS/default-synth-valmr" \
      --cases 6 --seed 6
    mkdir -p "$RUNS/default-ssl-volumes"                                   # images only: labels are not used
    cp "$RUNS"/default-real/imagesTr/*.nii.gz "$RUNS"/default-synth/imagesTr/*.nii.gz "$RUNS/default-ssl-volumes/"
    ;;
  pretrain)
    resume=(); [ -f "$RUNS/default-ssl/checkpoint.pt" ] && resume=(--resume)
    $LOGONET pretrain "$RUNS/default-ssl-volumes" --out "$RUNS/default-ssl" --model logonet --preset T \
      --spacing 3 --roi 64 --samples 2 --batch 1 --epochs 5 --warmup 1 --lr 1e-3 --amp bf16 --cache memory \
      --seed 0 --progress jsonl "${resume[@]}"
    ;;
  finetune)
    arm=${2:?scratch, ssl, demo, demo3 ... demo8}; seed=${3:?seed}
    init=(); extra=(); lr=4e-3; data=("$RUNS/default-real" "$RUNS/default-synth"); repeats=(20 1); epochs=(--epochs 8 --val-every 2)
    [ "$arm" = ssl ] && init=(--init "$RUNS/default-ssl/best")
    [ "$arm" = demo ] && { init=(--init "${STAGE1:-$RUNS/stage1-demo}"); lr=2e-3; }
    if [[ "$arm" == demo[3-8] ]]; then  # the stage-3 arms
      init=(--init "${STAGE2:-$RUNS/default-demo-s0/best}"); lr=1e-3; NPROC=${NPROC:-2}
      repeats+=(1); epochs=(--epochs 12 --val-every 3)
      case "$arm" in
        demo3) data+=("$RUNS/default-synth2") ;;
        demo4) data+=("$RUNS/default-synth3") ;;
        demo5) data+=("$RUNS/default-synth-mr"); epochs=(--epochs 10 --val-every 5) ;;
        demo6) data+=("$RUNS/default-synth-veins") ;;
        demo7) data+=("$RUNS/default-synth2"); epochs=(--epochs 10 --val-every 5); extra=(--slab-prob 0.5) ;;
        demo8) data+=("$RUNS/default-synth2" "$RUNS/default-synth-mr20"); repeats+=(1); epochs=(--epochs 8 --val-every 4) ;;
      esac
    fi
    out="$RUNS/default-$arm-s$seed"
    resume=(); [ -f "$out/checkpoint.pt" ] && resume=(--resume)
    launch finetune "${data[@]}" --repeats "${repeats[@]}" --val-data "$RUNS/default-synth-val" \
      --out "$out" "${COMMON[@]}" "${epochs[@]}" --warmup 1 --lr $lr --seed "$seed" \
      --name default --fp16-weights "${init[@]}" "${extra[@]}" "${resume[@]}"
    ;;
  postprocess)
    $LOGONET postprocess "$RUNS/default-${2:?arm}-s${3:?seed}/best" --val-data "$RUNS/default-synth-val" \
      "$RUNS/default-synth-val2"
    ;;
  evaluate)
    run="$RUNS/default-${2:?scratch or ssl}-s${3:?seed}"
    SAMPLE=${SAMPLE:-$HOME/.cache/logonet/sample}
    score() {  # score CT REFERENCE NAME: segment CT with the run's best card, Dice against REFERENCE
      $LOGONET segment "$1" "$run/eval/$3_seg.nii.gz" --model "$run/best"
      $LOGONET evaluate "$run/eval/$3_seg.nii.gz" "$2" --no-hausdorff --csv "$run/eval/$3_dice.csv"
    }
    score "$SAMPLE/example_ct_dicom" "$SAMPLE/example_seg_dicom_btcv.nii.gz" unseen
    score "$SAMPLE/example_ct.nii.gz" "$SAMPLE/example_ct_btcv.nii.gz" training
    ;;
  synthval)
    # outputs under $RUNS/synthval, never beside the card (the bundled card's folder is in the repository)
    model=${2:?model card folder}; val=${3:-default-synth-val}
    out="$RUNS/synthval/$(realpath --relative-to=. "$model" | tr / _)-${val#default-}"
    mkdir -p "$out"
    $LOGONET segment "$RUNS/$val/imagesTr" "$out" --model "$model" >/dev/null
    for seg in "$out"/*.nii.gz; do
      $LOGONET evaluate "$seg" "$RUNS/$val/labelsTr/$(basename "$seg")" --no-hausdorff --csv "${seg%.nii.gz}.csv" >/dev/null
    done
    ${PYTHON:-.venv/bin/python} scripts/arm_table.py --synthval "$out"
    ;;
  slabcheck)
    SAMPLE=${SAMPLE:-$HOME/.cache/logonet/sample}
    ${PYTHON:-.venv/bin/python} scripts/slab_check.py "${2:?model card folder}" "$RUNS/default-synth-val" \
      "$RUNS/default-synth-val2" --pair "$SAMPLE/example_ct.nii.gz:$SAMPLE/example_ct_btcv.nii.gz"
    ;;
  table)
    ${PYTHON:-.venv/bin/python} scripts/arm_table.py "$RUNS"
    ;;
  *) sed -n '2,/^# test scans/p' "$0"; exit 2 ;;
esac
