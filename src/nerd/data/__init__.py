"""Data: the evaluation noise protocol and training noise (`nerd.data.noise`)."""
