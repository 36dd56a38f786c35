"""The route handlers, one module per concern.

Each module holds one :class:`~scope_trio.http.routes.base.RouteGroup`: its ``ROUTES`` (data:
method, path, handler name, documentation) and the handlers, which share one
:class:`~scope_trio.http.routes.base.Context`. :func:`scope_trio.http.app.create_app`
registers every group's routes. To add a route: add a :class:`~scope_trio.http.openapi.Route`
to a group's ``ROUTES`` and the handler method it names.
"""
