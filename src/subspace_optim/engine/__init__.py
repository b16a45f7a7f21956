"""The optimizer's engine, under its torch.optim face (``optimizer.py``):

- ``settings``: the typed settings of a param group, their defaults and checks;
- ``subspace``: one weight's subspace (geometry, key, basis lifecycle, projection, write-back);
- ``step``: the standard step, as functions over named records;
- ``layerwise``: updates from post-accumulate-grad hooks, and the guard that undoes a non-finite one;
- ``state_io``: loading, converting and checking saved state.

Nothing here imports ``optimizer.py``: the optimizer is passed in where a function needs its books.
"""
