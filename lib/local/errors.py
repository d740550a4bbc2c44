"""Why the local stack could not start: the CLI prints these as one line, without a traceback."""


class StackError(RuntimeError):
    """本地栈无法启动或继续运行的原因（CLI 只打印这一行）"""
