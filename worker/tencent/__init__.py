"""tencent"""
