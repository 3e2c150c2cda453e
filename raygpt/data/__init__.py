"""Data: prepare text into token shards offline; read shards and windows while training."""
