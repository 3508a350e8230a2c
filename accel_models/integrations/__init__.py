"""Integrations with other serving frameworks.

Each integration lives in its own module and is imported only by that framework's plugin loader (or by
the user), so ``import accel_models`` never imports the framework:

* :mod:`accel_models.integrations.vllm`: the ``vllm.general_plugins`` entry point that registers the zoo in
  ``vllm.ModelRegistry``.
"""
