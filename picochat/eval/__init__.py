"""What is measured: bits per byte, multiple choice, generation and HumanEval (tasks.py, humaneval.py) over
any model behind backends.py, and lm-evaluation-harness's model interface (lm_eval_plugin.py)."""
