"""ADM guided diffusion (openai/guided-diffusion) with PixelAsParam guided sampling."""
