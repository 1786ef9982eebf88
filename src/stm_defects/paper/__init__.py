"""The report's two-stage method: AE1 maps, defect mask, AE2 + GMM classes."""
