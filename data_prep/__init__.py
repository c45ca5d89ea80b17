"""Raw CT + report corpus -> TFRecord shards (and the synthetic phantom corpus)."""
