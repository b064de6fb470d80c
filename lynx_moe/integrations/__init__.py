"""Thin adapters that switch a policy on inside an inference framework.

- ``hf``: Hugging Face transformers models in place (``apply_`` / ``remove_`` / ``applied``,
  ``routing_stats``), and the one finder of a model's routers and experts (``moe_layers``).
- ``vllm``: vLLM's ``general_plugins`` entry point (``LYNX_POLICY``), statistics and run-time
  switching over RPC. vLLM is imported inside its functions only.

Both import the core (``lynx_moe.policies``, ``lynx_moe.routing``, ``lynx_moe.presets``) and
nothing else of the package.
"""
