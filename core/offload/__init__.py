"""Layer offloading: decoder layers stay on disk or in host memory and stream through K device slots.

`config` (the options, torch-free: a client-only CLI imports it), `checkpoint` (safetensors shards read
in place), `sources` (where a layer's weights come from), `slots` (the device buffers), `prefetch` (the
hooks that load layers ahead of compute) and `loading` (building an offloaded model). This file imports
nothing, so importing `sinkstream.core.offload.config` stays torch-free.
"""
