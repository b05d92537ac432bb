"""HTTP routes, one router per resource: link, entities, ops."""
