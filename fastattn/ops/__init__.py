"""Custom ops (``torch.ops.fastattn.*``): validation, backend choice, fake and autograd."""
