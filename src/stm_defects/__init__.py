"""stm-defects: find and classify atomic-scale defects in STM images without labels."""
