"""Injector: the pure `inject(pod, settings)` function and the admission webhooks.

Not built yet.
"""
