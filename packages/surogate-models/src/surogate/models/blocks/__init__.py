"""Transformer block halves as autograd Functions with hand-written backward passes."""
