mkdir -p outputs
C='"data":{"views":{"min_views":2,"max_views":8,"max_images_per_batch":64},"synthetic":{"trajectories":["forward","orbit"]}}'
for spec in "fewviews|{$C}" "point|{$C,\"model\":{\"backbone\":{\"overrides\":{\"enable_point\":true}}}}" "relpose|{$C,\"model\":{\"loss\":{\"relative_pose\":1.0}}}" "lr1e-3|{$C,\"model\":{\"optim\":{\"lr\":0.001}}}"; do
  n=${spec%%|*}; o=${spec#*|}
  python benchmarks/pose_learning_probe.py "$n" --minutes 4.3 --pairs 30 --out $OUT --override "$o" > outputs/probe_$n.log 2>&1 &
done
wait
for f in outputs/probe_*.log; do echo == $f; grep -i "error\|Traceback" $f | head -3; done
