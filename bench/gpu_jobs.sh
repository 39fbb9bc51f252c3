#!/usr/bin/env bash
# One job per GPU of the machine, side by side, after `source bench/gpu_vllm.sh env`:
#
#   bash bench/gpu_jobs.sh "JOB FOR GPU 0" ["JOB FOR GPU 1" ...]
#
# Job i runs with CUDA_VISIBLE_DEVICES=i and its own TMPDIR=/tmp/g<i> (vLLM's work folder and
# compile-cache key follow TMPDIR, so the same job in a later call on the same machine starts
# warm), its output in $OUT/g<i> (the variable JOB_OUT inside the job) and its log in
# $OUT/g<i>.log. Ends with every job; the outputs are packed into $OUT/jobs.tar.gz (the
# device tool returns a limited number of files) and the exit status is the first failure's.
set -u
OUT=${OUT:-bench_out}
pids=()
i=0
for job in "$@"; do
  mkdir -p "/tmp/g$i" "$OUT/g$i"
  ( export CUDA_VISIBLE_DEVICES=$i TMPDIR=/tmp/g$i JOB_OUT="$OUT/g$i"
    echo "== GPU $i: $job"; bash -c "$job" ) >"$OUT/g$i.log" 2>&1 &
  pids+=($!)
  i=$((i + 1))
done
rc=0
for p in "${pids[@]}"; do wait "$p"; s=$?; [ "$rc" = 0 ] && rc=$s; done
for ((j = 0; j < i; j++)); do echo "== GPU $j (tail)"; tail -25 "$OUT/g$j.log"; done
tar -czf "$OUT/jobs.tar.gz" -C "$OUT" $(cd "$OUT" && ls -d g* 2>/dev/null) && rm -rf "$OUT"/g*
exit $rc
