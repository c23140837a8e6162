"""The Gradio page of ``sam3lora-demo``: image + prompts in, one overlay per model, an instance table, downloads.

Box prompts: Gradio has no box drawing on images, so a box is made by clicking two opposite corners on the
image (``gr.Image.select`` gives pixel coordinates), which appends ``x0,y0,x1,y1`` to the *Exemplar boxes*
textbox; boxes can also be typed there, one per line. Every failure is shown in the page as one line
(``gr.Error``), never a traceback; uploads are checked by ``service.check_upload``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd
import torch
from PIL import Image

from sam3lora.demo.examples import Example
from sam3lora.demo.service import DEFAULT_LIMITS, ROW_HEADERS, DemoService, UploadLimits, add_corner, check_upload
from sam3lora.errors import one_line, user_errors

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # Blocks(analytics_enabled=False) too: no telemetry
log = logging.getLogger(__name__)
NAME_KEY = "sam3lora_name"  # PIL image info key carrying the upload's file name
BOX_HINT = "Click two opposite corners on the image to add an exemplar box, or type x0,y0,x1,y1 below."


def read_upload(payload: Any, limits: UploadLimits) -> Image.Image | None:
    """The image of a raw ``gr.Image`` payload (``{"path", "orig_name", ...}``, events run with
    ``preprocess=False``) checked by ``check_upload``; its file name goes to ``info[NAME_KEY]``. None when empty.

    Gradio's own preprocessing is skipped on purpose: it decodes the file first and reports a file that is not an
    image with a long internal message; here every refusal is one ``gr.Error`` line naming the problem.
    """
    if not payload:
        return None
    path = payload.get("path") if isinstance(payload, Mapping) else None
    name = (payload.get("orig_name") if isinstance(payload, Mapping) else None) or None
    if not path:
        raise gr.Error("the upload could not be read: upload the image file again", print_exception=False)
    try:
        picture = check_upload(path, limits, name=name)
    except user_errors() as err:
        raise gr.Error(one_line(err), title="Upload refused", print_exception=False) from None
    picture.info[NAME_KEY] = name or Path(path).name
    return picture


def _error(err: BaseException) -> gr.Error:
    """A one-line ``gr.Error`` for any failure of a prediction (details of unexpected ones go to the log)."""
    if isinstance(err, user_errors()):
        return gr.Error(one_line(err), print_exception=False)
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return gr.Error("out of memory: use a smaller image, fewer prompts, or a lower --dtype", print_exception=False)
    log.exception("prediction failed")
    return gr.Error(f"prediction failed ({type(err).__name__}: {one_line(err)}); the server log has the details",
                    print_exception=False)


def _header(service: DemoService, descriptions: Mapping[str, str]) -> str:
    models = "; ".join(f"**{label}**" + (f" ({descriptions[label]})" if label in descriptions else "")
                       for label, _ in service.models)
    return (
        "# SAM 3 + LoRA: base and fine-tuned side by side\n"
        f"Models: {models}. Upload an image or pick an example, type text prompts (comma-separated) and/or draw "
        "exemplar boxes, then press **Segment**."
    )


def build_app(
    service: DemoService,
    examples: Sequence[Example] = (),
    limits: UploadLimits = DEFAULT_LIMITS,
    threshold: float = 0.5,
    mask_threshold: float = 0.5,
    descriptions: Mapping[str, str] | None = None,
) -> gr.Blocks:
    """The page. ``descriptions`` maps model labels (``base``, adapter names) to a line shown in the header."""

    def segment(payload, prompts, boxes, thresh, mask_thresh, progress=gr.Progress()):  # noqa: B008 (Gradio API)
        image = read_upload(payload, limits)
        if image is None:
            raise gr.Error("no image: upload one or pick an example", print_exception=False)
        try:
            result = service.predict(image, prompts, boxes, float(thresh), float(mask_thresh),
                                     progress=lambda f, text: progress(f, desc=text),
                                     image_name=image.info.get(NAME_KEY, "image"))
        except Exception as err:  # every failure becomes one readable line in the page
            raise _error(err) from None
        table = pd.DataFrame(result.table(), columns=list(ROW_HEADERS))
        return result.overlays, result.summary, table, [str(result.masks_zip), str(result.coco_json)]

    def new_image(payload):
        """A new image: check it at once (a refused upload shows its message now) and forget the old boxes."""
        read_upload(payload, limits)
        return None, "", BOX_HINT

    def corner(pending, boxes_text, evt: gr.SelectData):
        x, y = evt.index[:2]
        return add_corner(pending, boxes_text, x, y)

    with gr.Blocks(title="sam3lora demo", analytics_enabled=False) as app:
        gr.Markdown(_header(service, descriptions or {}))
        pending = gr.State(None)
        with gr.Row():
            with gr.Column(scale=2):
                image = gr.Image(type="filepath", label="Image (click two corners to add a box)",
                                 sources=["upload", "clipboard"], elem_id="image")
                prompts = gr.Textbox(label="Text prompts", placeholder="red circle, blue square", elem_id="prompts",
                                     info="One or more, separated by commas.")
                boxes = gr.Textbox(label="Exemplar boxes", placeholder="x0,y0,x1,y1 (pixels), one per line",
                                   lines=2, elem_id="boxes")
                hint = gr.Markdown(BOX_HINT, elem_id="box-hint")
                with gr.Row():
                    thresh = gr.Slider(0, 1, value=threshold, step=0.01, label="Score threshold", elem_id="threshold")
                    mask_thresh = gr.Slider(0.01, 0.99, value=mask_threshold, step=0.01, label="Mask threshold")
                with gr.Row():
                    run = gr.Button("Segment", variant="primary", elem_id="run")
                    clear = gr.Button("Clear boxes", elem_id="clear-boxes")
                if examples:
                    gr.Examples([[str(e.image), e.prompt] for e in examples], inputs=[image, prompts],
                                cache_examples=False, label="Examples (click one)", elem_id="examples")
            with gr.Column(scale=3):
                gallery = gr.Gallery(label="Overlays: masks, boxes and scores per model", elem_id="overlays",
                                     columns=max(1, len(service.models)), object_fit="contain", height="auto")
                summary = gr.Markdown(elem_id="summary")
                table = gr.Dataframe(headers=list(ROW_HEADERS), label="Instances", elem_id="instances",
                                     interactive=False, wrap=True)
                files = gr.File(label="Downloads: masks (zip of PNGs) and COCO json", file_count="multiple",
                                elem_id="downloads", interactive=False)
        inputs = [image, prompts, boxes, thresh, mask_thresh]
        outputs = [gallery, summary, table, files]
        # preprocess=False: the handlers get the raw values and check the upload themselves (read_upload)
        run.click(segment, inputs, outputs, concurrency_limit=1, api_name="segment", preprocess=False)
        prompts.submit(segment, inputs, outputs, concurrency_limit=1, api_name=False, preprocess=False)
        image.select(corner, [pending, boxes], [pending, boxes, hint], api_name=False)
        image.change(new_image, image, [pending, boxes, hint], api_name=False, preprocess=False)
        clear.click(lambda: (None, "", BOX_HINT), None, [pending, boxes, hint], api_name=False)
    return app


def launch(
    app: gr.Blocks, host: str = "127.0.0.1", port: int = 7860, limits: UploadLimits = DEFAULT_LIMITS,
    block: bool = True, quiet: bool = False,
) -> str:
    """Serve ``app`` on ``host:port`` (no share link, no telemetry); returns the local URL. With ``block`` it
    serves until interrupted; otherwise it returns at once (``app.close()`` stops it)."""
    _, url, _ = app.launch(
        server_name=host, server_port=port, share=False, prevent_thread_lock=not block, quiet=quiet,
        show_error=True, max_file_size=int(limits.max_megabytes * 2**20), ssr_mode=False, pwa=False,
        mcp_server=False, enable_monitoring=False,
    )
    return url
