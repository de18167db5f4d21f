export PYTHONPATH=$PWD:/tmp/site XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 580 python experiments/bench_fast_dllm.py --lengths 256,512,1024 2>&1 | grep -v "slow_operation\|\*\*\*\|Very slow\|^$" | tail -30 | tee $OUT/fast_dllm.txt
cp experiments/results/fast_dllm.json $OUT/ 2>/dev/null
