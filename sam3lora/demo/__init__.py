"""``sam3lora-demo``: a Gradio app that shows the base SAM 3 and each LoRA adapter side by side on one image.

``service`` holds the prediction logic (no Gradio: testable without a browser), ``app`` the page, ``runs`` finds
the newest training run's adapter and its base, ``examples`` the example images. Gradio is the optional extra
``sam3lora[demo]``; importing this package does not import it.
"""
