"""User tools built on the library: the ``foam-hf`` command line and what its subcommands run.

* :mod:`foam_hf.tools.cli`: the ``foam-hf`` console script (and ``python -m foam_hf``);
* :mod:`foam_hf.tools.memory_report`: optimizer-state memory of AdamW against FOAM for a model, from its
  config (``foam-hf memory``), with its model table :mod:`foam_hf.tools.model_shapes` and its Markdown
  form :mod:`foam_hf.tools.memory_markdown`;
* :mod:`foam_hf.tools.demo` and :mod:`foam_hf.tools.demo_training`: ``foam-hf demo``, a tiny Llama
  pre-trained through ``transformers.Trainer`` with AdamW and with FOAM.

The tools import the library; the library (optimizer, folding, config, param groups, integration, ZeRO)
never imports a tool. Importing this package imports nothing else.
"""
