package metrics

import (
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Path is where Serve serves the metrics.
const Path = "/metrics"

// unixPrefix marks a unix socket address for Serve.
const unixPrefix = "unix:"

// Server serves a registry over HTTP until Close.
type Server struct {
	ln   net.Listener
	srv  *http.Server
	done chan error // Serve's result

	closeOnce sync.Once
	closeErr  error
}

// Serve listens on addr and serves reg's metrics at /metrics in the
// Prometheus text format. addr is host:port for TCP ("127.0.0.1:9100",
// ":9100"), or "unix:" followed by a path for a unix socket; a stale socket
// left at the path by an earlier run is replaced. A collector that fails
// does not hide the others: the scrape shows what could be gathered.
func Serve(addr string, reg prometheus.Gatherer) (*Server, error) {
	ln, err := listen(addr)
	if err != nil {
		return nil, err
	}
	mux := http.NewServeMux()
	mux.Handle(Path, promhttp.HandlerFor(reg, promhttp.HandlerOpts{ErrorHandling: promhttp.ContinueOnError}))
	s := &Server{
		ln: ln,
		srv: &http.Server{
			Handler: mux,
			// A scraper that stalls must not hold a connection forever.
			ReadHeaderTimeout: 10 * time.Second,
			WriteTimeout:      30 * time.Second,
			IdleTimeout:       time.Minute,
		},
		done: make(chan error, 1),
	}
	go func() { s.done <- s.srv.Serve(ln) }()
	return s, nil
}

func listen(addr string) (net.Listener, error) {
	path, ok := strings.CutPrefix(addr, unixPrefix)
	if !ok {
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			return nil, fmt.Errorf("metrics: listen on %s: %w", addr, err)
		}
		return ln, nil
	}
	if path == "" {
		return nil, fmt.Errorf("metrics: address %q has no socket path", addr)
	}
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode()&os.ModeSocket == 0 {
			return nil, fmt.Errorf("metrics: socket path %s exists and is not a socket", path)
		}
		if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
			c.Close()
			return nil, fmt.Errorf("metrics: socket path %s is in use by another process", path)
		}
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("metrics: removing stale socket %s: %w", path, err)
		}
	}
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("metrics: listen on %s: %w", path, err)
	}
	ln.SetUnlinkOnClose(true)
	return ln, nil
}

// Addr is the address the server listens on (with the port chosen for
// port 0).
func (s *Server) Addr() net.Addr { return s.ln.Addr() }

// URL is the address of the metrics, for a TCP server: http://host:port/metrics.
func (s *Server) URL() string { return "http://" + s.ln.Addr().String() + Path }

// Close stops listening, closes every connection (a scrape in progress is
// cut short) and removes a unix socket. It returns the error that stopped
// serving before Close, if any.
func (s *Server) Close() error {
	s.closeOnce.Do(func() {
		err := s.srv.Close()
		if serr := <-s.done; !errors.Is(serr, http.ErrServerClosed) {
			err = errors.Join(err, serr)
		}
		s.closeErr = err
	})
	return s.closeErr
}
