"""``python -m captum_mllm``: the ``captum-mllm`` command."""

from captum_mllm.cli import main

main()
