"""Evaluation and benchmarks: VideoQA scoring, the quality table, throughput, scale, engine and SSD benchmarks."""
