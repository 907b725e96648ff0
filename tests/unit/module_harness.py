"""Run a gpulab module's main() in-process: exit_json/fail_json raise instead of exiting the test."""


class ModuleExit(BaseException):
    """Raised instead of exit_json/fail_json. Not an Exception, so the module's catch-all does not swallow it."""

    def __init__(self, result):
        super().__init__(result)
        self.result = result


class ModuleFail(ModuleExit):
    pass
