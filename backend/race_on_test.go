//go:build race

package backend

// raceEnabled reports whether the tests run with the race detector.
const raceEnabled = true
