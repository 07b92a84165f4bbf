"""`python -m dllm_rl ...` (and `deepspeed -m dllm_rl train RECIPE`) runs the CLI."""

import sys

from .cli import main

sys.exit(main())
