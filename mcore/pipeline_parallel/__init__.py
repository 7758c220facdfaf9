"""mcore.pipeline_parallel"""
