"""flash_attn.layers' module paths under flashtron (`from flash_attn.layers.rotary import ...` becomes
`from flashtron.layers.rotary import ...`)."""
