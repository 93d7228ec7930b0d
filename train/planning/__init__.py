"""What `python -m train.plan` is made of; `train.train` uses the policy too.

  policy   the row to plan (`Shape`, `config_shape`, `shape_for`) and the mesh
           (`choose_mesh`; `resolve_mesh`: what `mesh="auto"` means, for the planner
           and for `train.train` alike)
  aot      slices without a TPU: libtpu's compile-only devices (`topology`), the
           environment libtpu and XLA read before jax starts, the ahead-of-time compile
  buffers  what takes the memory: XLA's dumped buffer assignment (peak, largest buffers)
  inference  --inference: prefill and decode memory per device, fits, decode roofline
  report   the run-plan report (`run_plan_report`): mesh, attention per tower,
           placements, offloads, remat, fallbacks; printed before compiling
"""
