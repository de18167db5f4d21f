export PYTHONPATH=$PWD:/tmp/site XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 585 python experiments/dllm_sort.py --b1-num 100 2>&1 | grep -v "it/s\]\|step/s\]\|s/step\]" | tail -40 | tee $OUT/dllm_sort.txt
cp experiments/results/dllm_sort.json $OUT/ 2>/dev/null
cp runs/dllm_sort_100m/metrics.jsonl runs/dllm_sort_100m/eval.json runs/dllm_sort_100m/*.png $OUT/ 2>/dev/null
