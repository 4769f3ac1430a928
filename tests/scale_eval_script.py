"""Run under `accelerate launch` (any number of processes): evaluate a model folder on the records of
`records()` and, on the main process, save the metrics, the examples (without images) and the seconds
the evaluation took. tests/test_scale.py compares them with one process's evaluation.

    python tests/scale_eval_script.py MODEL_DIR OUT.pt [SHAPES_IMAGES [BATCH_SIZE]]
"""

import sys
import time
from pathlib import Path

import torch


def records(shapes_images: int = 5) -> list[dict]:
    """The four drawn images of tests/test_api.py (a caption and a question each), then shapes images."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_api import QUESTION, WORLD, world_images

    from train.data.shapes import ShapesDataset

    recs = []
    for i, (image, (_, _, caption, answer)) in enumerate(zip(world_images(), WORLD)):
        recs.append({"image": image, "image_id": f"w{i}", "task": "caption", "prompt": "", "target": caption})
        recs.append({"image": image, "image_id": f"w{i}", "task": "vqa", "prompt": QUESTION, "target": answer})
    val = ShapesDataset("validation", max(1, shapes_images), 64)
    for i in range(shapes_images):
        recs += val.records_for_image(i)
    return recs


def main(argv: list[str]) -> None:
    from accelerate import PartialState
    from accelerate.utils import gather_object

    import train.evaluate as ev
    from mmgpt import MMGPTModel, MMGPTProcessor
    from train.evaluate import evaluate

    model_dir, out_file = argv[:2]
    n_shapes = int(argv[2]) if len(argv) > 2 else 5
    batch_size = int(argv[3]) if len(argv) > 3 else 2
    state = PartialState(cpu=True)  # as Accelerator(cpu=True) does under ACCELERATE_USE_CPU=1
    torch.set_num_threads(1)
    model = MMGPTModel.from_pretrained(model_dir).eval()
    processor = MMGPTProcessor.from_pretrained(model_dir)
    recs = records(n_shapes)
    ran = []  # how many (image, prompt) pairs this process generated for
    local = ev.generate_texts

    def counted(model, processor, images, *args, **kwargs):
        ran.append(len(images))
        return local(model, processor, images, *args, **kwargs)

    ev.generate_texts = counted  # what train.dist_eval calls for this process's share
    state.wait_for_everyone()
    t0, c0 = time.perf_counter(), time.process_time()
    result = evaluate(model, processor, recs, batch_size=batch_size, caption_scorers=("bleu", "cider"))
    seconds = time.perf_counter() - t0
    shares = gather_object([sum(ran)])
    cpu = gather_object([time.process_time() - c0])  # each process's CPU seconds (its share of the work)
    if state.is_main_process:
        examples = [{k: v for k, v in e.items() if k != "image"} for e in result.examples]
        torch.save({"metrics": result.metrics, "examples": examples, "seconds": seconds,
                    "world": state.num_processes, "shares": shares, "cpu_seconds": cpu}, out_file)
    state.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1:])
