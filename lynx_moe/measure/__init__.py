"""The measurement library behind ``lynx profile / bench / eval / demo`` and the benchmarks.

No argparse and no printing: functions take models, tensors and plain values, return dicts,
and raise ``ValueError`` / ``FileNotFoundError`` (``ImportError`` naming the extra to install)
for bad input. The command line (``lynx_moe.cli``) parses arguments, calls these and prints.

- ``models``: load a model folder; tiny random models of every supported architecture;
- ``shapes``: realistic-shape stacks with random weights that replay recorded router logits;
- ``data``: held-out text, token batches, the model's lm-eval tasks;
- ``decode``: the one decode loop (prefill, decode steps, teacher forcing, greedy, recording);
- ``metrics``: KL, agreement, perplexity, bootstrap intervals (pure functions);
- ``quality``: quality of policies against native routing in decode mode;
- ``speed``: interleaved decode timing and the bytes a step reads;
- ``machine``: copy bandwidth and the conditions of a run;
- ``similarity``: expert similarity matrices for SERE (``lynx similarity``);
- ``sizes``: expert output-size fits for SizePrice (``lynx sizes``);
- ``tune``: ``lynx tune``'s search; ``frontier``: every policy's knob swept (``lynx frontier``);
- ``gates``: the cached cost-model calibrations that gate policies by default;
- ``profile``: distinct experts, load skew and bin overlap of a routing recording;
- ``plots``: every PNG; ``lm_eval``: the lm-evaluation-harness model ``lynx-hf``.

Imports go one way: core <- integrations <- measure <- cli.
"""
