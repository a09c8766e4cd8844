"""Evaluation of generated Shapes pictures: `unclip.eval.judge` checks an image against its prompt.

Nothing is re-exported here, so that `unclip.eval.judge` stays the module, not its function.
"""
