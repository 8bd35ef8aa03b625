"""Pictures people would rather look at: hyperschedules, training curves, denoising traces.

Matplotlib is imported lazily (Agg backend) so that importing hdlm stays cheap.
"""
