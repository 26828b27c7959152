package main

import (
	"bufio"
	"context"
	"errors"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// `dimoo serve` answers on its address and stops cleanly when its context
// ends (SIGINT in main); bad --devices are usage errors.
func TestServeCommand(t *testing.T) {
	needLibrary(t)
	err := run(context.Background(), []string{"serve", "--devices", "7"}, io.Discard)
	assert.True(t, errors.Is(err, errUsage), "%v", err)

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	pr, pw := io.Pipe()
	done := make(chan error, 1)
	go func() {
		done <- run(ctx, []string{"serve", "--addr", "127.0.0.1:0", "--threads", "1", "--shutdown_timeout", "5s"}, pw)
		pw.Close()
	}()
	line, err := bufio.NewReader(pr).ReadString('\n')
	require.NoError(t, err)
	go io.Copy(io.Discard, pr)
	i := strings.Index(line, "http://")
	require.GreaterOrEqual(t, i, 0, line)
	url := strings.Fields(line[i:])[0]
	resp, err := http.Get(url + "/healthz")
	require.NoError(t, err)
	resp.Body.Close()
	assert.Equal(t, http.StatusOK, resp.StatusCode)
	cancel()
	select {
	case err := <-done:
		assert.NoError(t, err)
	case <-time.After(20 * time.Second):
		t.Fatal("serve did not stop")
	}
}
