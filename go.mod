module github.com/vublk/vublk

go 1.26.0

require (
	github.com/sirupsen/logrus v1.10.2 // indirect
	golang.org/x/sys v0.50.0 // indirect
)
