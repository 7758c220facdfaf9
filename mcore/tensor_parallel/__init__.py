"""mcore.tensor_parallel"""
