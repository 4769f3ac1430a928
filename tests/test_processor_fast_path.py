import torch
from PIL import Image

from mmgpt import build_model


def test_batched_pixel_path_equals_the_eval_transform():
    _, proc = build_model("tiny", texts=["a red circle"])
    g = torch.Generator().manual_seed(0)
    imgs = [Image.fromarray(torch.randint(0, 256, (64, 64, 3), generator=g, dtype=torch.uint8).numpy()) for _ in range(3)]
    fast = proc.pixel_values(imgs)
    slow = torch.stack([proc.eval_transform(im) for im in imgs])
    assert torch.allclose(fast, slow, atol=1e-6)
    # Other sizes take the transform path.
    big = [im.resize((80, 80)) for im in imgs]
    assert proc.pixel_values(big).shape == (3, 3, 64, 64)
