#!/usr/bin/env bash
# The GPU checks in one run, for a CUDA machine (none has been lent to this project yet; rehearsed with DEV=cpu):
#   1. smoke: `deim train` DEIM-N (2 epochs) and DEIM-S (1 epoch, multi-scale) on the quick set, then `deim val
#      half=True` and `deim predict half=True` of the DEIM-N run; the script stops here if any of them fails;
#      and `deim train` DEIMv2-N and DEIMv2-S (1 epoch each: the gate-less and ViT paths under AMP);
#   2. latency: benchmarks/latency.py --backends torch (PyTorch fp32 / fp16 on CUDA, batch 1, 640), DEIMv2 rows included;
#   3. the quick set's rows a and f with AMP (seeds 0 1) and row a without AMP (seeds 0 1), side by side;
#   4. benchmarks/half_precision.py on the AMP-trained seed 0: val mAP in fp32 and fp16, raw-score drift, Inf/NaN;
#   5. the real fine-tuning recipe: `deim train model=dfine-s-obj2coco.pt data=<deepforest> imgsz=640`, when the
#      machine has the files (it reaches no network): DFINE_S_OBJ2COCO=<the authors' dfine_s_obj2coco.pth> and
#      DEEPFOREST=<a built deepforest data YAML, e.g. from `python -m deim_ultra.data.deepforest`>; FT_EPOCHS, FT_CAP.
# Everything lands in $OUT/r (logs, results.csv files, stages.txt with the elapsed seconds of each stage) and is packed
# into $OUT/results.tar.gz (weights and images left out). Run from the repository root:
#   DEV=0 OUT=runs/gpu_checks bash benchmarks/gpu_checks.sh
# DEV=cpu EPOCHS=2 SMOKE_EPOCHS=1 rehearses it on a CPU (stage 4 then stops: fp16 needs CUDA). CAP bounds stage 3 in
# seconds. On a machine without the package installed, WHEELS=<folder of wheels> installs them into /tmp/site first
# (ultralytics and what it needs beyond torch); the repository itself is put on PYTHONPATH.
set -u
DEV=${DEV:-0}; EPOCHS=${EPOCHS:-32}; CAP=${CAP:-270}; SMOKE_EPOCHS=${SMOKE_EPOCHS:-2}
export PYTHONUNBUFFERED=1 YOLO_OFFLINE=1 YOLO_AUTOINSTALL=False YOLO_CONFIG_DIR=${YOLO_CONFIG_DIR:-/tmp/ycfg}
OUT=${OUT:-runs/gpu_checks}; mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd); R=$OUT/r; mkdir -p $R
T0=$(date +%s); t(){ echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a $R/stages.txt; }
finish(){ t "packing"; (cd $OUT && tar czf results.tar.gz --exclude='*.pt' --exclude='*.png' --exclude='*.jpg' --exclude='images' --exclude='labels' --exclude='*.cache' r); ls -la $OUT; }
trap finish EXIT
export PYTHONPATH=$PWD
if [ -n "${WHEELS:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
t "env"
{ nvidia-smi; python3 -c "import sys, torch, torchvision, ultralytics; print(sys.version); print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'ultralytics', ultralytics.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name(0))"
  python3 -c "import tensorrt; print('tensorrt', tensorrt.__version__)"; ls /usr/lib/x86_64-linux-gnu 2>/dev/null | grep -i nvinfer
  python3 -m pip list 2>/dev/null | grep -i -E "tensorrt|onnx|openvino|polars"; nproc; free -g; } > $R/env.txt 2>&1
cat $R/env.txt | tail -12

t "smoke: CLI train / val / predict on $DEV"
QD=$(mktemp -d)  # the quick set, outside $OUT so its images do not travel back
python3 -c "from deim_ultra.data.synthetic import make_synthetic_dataset as m; import sys; sys.path.insert(0, 'benchmarks'); from convergence import QUICK_DATA; print(m('$QD', **QUICK_DATA))" > $R/smoke_data.txt 2>&1 || { cat $R/smoke_data.txt; exit 1; }
Q=$(tail -1 $R/smoke_data.txt)
timeout 360 bash -c "set -e
  python3 -m deim_ultra.cli train model=deim-n.yaml data=$Q epochs=$SMOKE_EPOCHS imgsz=128 batch=16 device=$DEV workers=2 plots=False project=$R/smoke name=n exist_ok=True
  python3 -m deim_ultra.cli train model=deim-s.yaml data=$Q epochs=1 imgsz=256 batch=16 device=$DEV workers=2 plots=False project=$R/smoke name=s exist_ok=True
  python3 -m deim_ultra.cli train model=deimv2-n.yaml data=$Q epochs=1 imgsz=128 batch=16 device=$DEV workers=2 plots=False project=$R/smoke name=v2n exist_ok=True
  python3 -m deim_ultra.cli train model=deimv2-s.yaml data=$Q epochs=1 imgsz=256 batch=16 device=$DEV workers=2 plots=False project=$R/smoke name=v2s exist_ok=True
  python3 -m deim_ultra.cli val model=$R/smoke/n/weights/last.pt data=$Q imgsz=128 device=$DEV half=True plots=False project=$R/smoke name=val exist_ok=True
  python3 -m deim_ultra.cli predict model=$R/smoke/n/weights/last.pt source=$QD/images/val imgsz=128 device=$DEV half=True save=False project=$R/smoke name=pred exist_ok=True
" > $R/smoke.log 2>&1
rc=$?; tail -25 $R/smoke.log; t "smoke rc $rc"; [ $rc = 0 ] || exit 1

t "latency (pytorch)"
timeout 150 python3 benchmarks/latency.py --backends torch --models deim-n deim-s deimv2-atto deimv2-pico deimv2-n deimv2-s yolo26n yolo26s rtdetr-l --threads 8 > $R/latency.txt 2>&1; t "latency rc $?"
tail -22 $R/latency.txt

t "convergence on the quick set: a, f with AMP (seeds 0 1), a without AMP (seeds 0 1), side by side"
timeout $CAP python3 benchmarks/convergence.py --quick --rows a f --seeds 0 1 --device $DEV --epochs $EPOCHS --jobs 4 --out $R/amp > $R/amp.txt 2>&1 &
P1=$!
timeout $CAP python3 benchmarks/convergence.py --quick --rows a --seeds 0 1 --device $DEV --epochs $EPOCHS --no-amp --jobs 2 --out $R/fp32 > $R/fp32.txt 2>&1 &
P2=$!
wait $P1; r1=$?; wait $P2; r2=$?; t "convergence rc $r1 / $r2"
tail -20 $R/amp.txt; tail -8 $R/fp32.txt

t "half precision on the AMP-trained seed 0"
W=$R/amp/a_seed0/weights/best.pt; [ -f $W ] || W=$R/amp/a_seed0/weights/last.pt
timeout 60 python3 benchmarks/half_precision.py $W --data $R/amp/dense_shapes/data.yaml --imgsz 128 --device $DEV > $R/half.txt 2>&1; t "half rc $?"
tail -8 $R/half.txt

t "fine-tune dfine-s-obj2coco.pt on deepforest at 640"
if [ -f "${DFINE_S_OBJ2COCO:-}" ] && [ -f "${DEEPFOREST:-}" ]; then
  WD=$(python3 -c "from ultralytics.utils import SETTINGS; print(SETTINGS['weights_dir'])"); mkdir -p "$WD"
  cp "$DFINE_S_OBJ2COCO" "$WD/dfine_s_obj2coco.pth"  # converted from there, with no download (deim_ultra.checkpoints.zoo)
  timeout ${FT_CAP:-900} python3 -m deim_ultra.cli train model=dfine-s-obj2coco.pt data=$DEEPFOREST epochs=${FT_EPOCHS:-72} imgsz=640 batch=16 device=$DEV workers=4 plots=False project=$R/finetune name=dfine_s exist_ok=True > $R/finetune.log 2>&1
  t "fine-tune rc $?"; grep -E "transferred by name|Transferred" $R/finetune.log; tail -5 $R/finetune/dfine_s/results.csv
else
  t "fine-tune skipped: set DFINE_S_OBJ2COCO and DEEPFOREST to files on this machine"
fi
