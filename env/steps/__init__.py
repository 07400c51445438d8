"""The steps of ``inv run``, one module each, in the order ``env.launcher.run`` takes them.

============  ========================================================================================
presets       layer the presets over the environment (``layered``), and say how (``describe_layers``)
interpreter   pick and describe the interpreter that installs and serves (``choose_interpreter``)
port          check that the port is free, naming the process that holds it (``check_port``)
install       install ``requirements/<cpu|gpu>.txt`` with that interpreter (``install``)
download      make the model ready, here or in that interpreter (``download_with``)
preflight     ``python -m service.preflight`` with that interpreter (``preflight``)
============  ========================================================================================

``errors`` holds ``LaunchError`` and the exit codes that every step raises with.  ``env.launcher`` runs the
steps (``run``, ``download_only``, ...) and re-exports their public names.  Nothing here is imported by
``env`` itself: the service never loads the launcher.
"""
