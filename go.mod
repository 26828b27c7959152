module github.com/dimoo-dev/dimoo

go 1.26.0

require (
	github.com/ebitengine/purego v0.11.3
	golang.org/x/sync v0.25.0
)
