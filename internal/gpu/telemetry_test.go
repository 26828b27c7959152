package gpu

import (
	"errors"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func fakeSeries() *Fake {
	return &Fake{
		Devices: []Device{{Name: "NVIDIA H200", UUID: "GPU-0", MemoryTotal: 141 << 30}, {Name: "NVIDIA H100"}},
		Series: [][]Device{{
			{PowerWatts: 100, SMClockMHz: 1980, MemClockMHz: 2619, MemoryUsed: 1 << 30, Utilization: 0},
			{PowerWatts: 500, SMClockMHz: 1800, MemClockMHz: 2619, MemoryUsed: 20 << 30, Utilization: 100},
			{PowerWatts: 700, SMClockMHz: 1755, MemClockMHz: 2619, MemoryUsed: 24 << 30, Utilization: 98},
			{PowerWatts: 300, SMClockMHz: 1980, MemClockMHz: 2619, MemoryUsed: 2 << 30, Utilization: 50},
		}},
	}
}

// The Fake steps through its series per device, keeps the identity, and
// repeats the last entry; devices without a series stay fixed.
func TestFakeSeries(t *testing.T) {
	f := fakeSeries()
	var w []float64
	for range 6 {
		d, err := f.Device(0)
		require.NoError(t, err)
		assert.Equal(t, "NVIDIA H200", d.Name)
		assert.Equal(t, uint64(141<<30), d.MemoryTotal)
		w = append(w, d.PowerWatts)
	}
	assert.Equal(t, []float64{100, 500, 700, 300, 300, 300}, w)
	d, err := f.Device(1)
	require.NoError(t, err)
	assert.Equal(t, Device{Index: 1, Name: "NVIDIA H100"}, d)
}

// The summary's arithmetic on fixed samples: min/median/max per metric
// (an even count's median is the mean of the middle two), the peak memory,
// and the energy as trapezoids over the sample times.
func TestSummarize(t *testing.T) {
	t0 := time.Unix(1000, 0)
	at := func(ms int) time.Time { return t0.Add(time.Duration(ms) * time.Millisecond) }
	f := fakeSeries()
	var samples []Sample
	for k := range 4 {
		d, err := f.Device(0)
		require.NoError(t, err)
		samples = append(samples, Sample{At: at(100 * k), Device: d})
	}
	// A second device, given out of order: sorted by time within it.
	samples = append(samples,
		Sample{At: at(200), Device: Device{Index: 1, Name: "NVIDIA H100", PowerWatts: 10, MemoryUsed: 5}},
		Sample{At: at(0), Device: Device{Index: 1, Name: "NVIDIA H100", PowerWatts: 30, MemoryUsed: 7}},
		Sample{At: at(100), Device: Device{Index: 1, Name: "NVIDIA H100", PowerWatts: 20, MemoryUsed: 6}})
	s := Summarize(samples)
	require.Len(t, s, 2)
	a := s[0]
	assert.Equal(t, 0, a.Index)
	assert.Equal(t, "NVIDIA H200", a.Name)
	assert.Equal(t, 4, a.Samples)
	assert.InDelta(t, 0.3, a.SpanSeconds, 1e-12)
	assert.Equal(t, Stat{Min: 100, Median: 400, Max: 700}, a.PowerWatts)
	assert.Equal(t, Stat{Min: 1755, Median: 1890, Max: 1980}, a.SMClockMHz)
	assert.Equal(t, Stat{Min: 2619, Median: 2619, Max: 2619}, a.MemClockMHz)
	assert.Equal(t, Stat{Min: 0, Median: 74, Max: 100}, a.Utilization)
	assert.Equal(t, Stat{Min: 1 << 30, Median: 11 << 30, Max: 24 << 30}, a.MemoryUsed)
	assert.Equal(t, uint64(24<<30), a.PeakMemory)
	assert.Equal(t, uint64(141<<30), a.MemoryTotal)
	// 0.1 s x ((100+500)/2 + (500+700)/2 + (700+300)/2) = 0.1 x 1400
	assert.InDelta(t, 140.0, a.EnergyJoules, 1e-9)
	assert.Equal(t, "gpu0 NVIDIA H200: power 100/400/700 W, SM 1755/1890/1980 MHz, mem 2619/2619/2619 MHz, "+
		"util 0/74/100%, memory peak 24.00 GiB of 141, 140 J (4 samples, min/median/max)", a.String())

	b := s[1]
	assert.Equal(t, 1, b.Index)
	assert.Equal(t, Stat{Min: 10, Median: 20, Max: 30}, b.PowerWatts)
	assert.Equal(t, uint64(7), b.PeakMemory)
	assert.InDelta(t, 0.1*(25+15), b.EnergyJoules, 1e-9) // in time order: 30, 20, 10
	assert.Empty(t, Summarize(nil))
	one := Summarize(samples[:1])
	require.Len(t, one, 1)
	assert.Equal(t, Stat{Min: 100, Median: 100, Max: 100}, one[0].PowerWatts)
	assert.Zero(t, one[0].EnergyJoules)
}

// The sampler takes one sample at the start, one per tick and one at Stop,
// of every device asked for; the window filter and the errors count.
func TestSampler(t *testing.T) {
	f := fakeSeries()
	tick := make(chan time.Time)
	s := startSampler(f, []int{0, 1}, tick)
	for range 2 {
		tick <- time.Now() // unbuffered: the previous tick's sample is taken once this one is received
	}
	s.SampleNow()
	all := s.Stop()
	require.Len(t, all, 10, "start + 2 ticks + SampleNow + stop, 2 devices")
	var p0 []float64
	for _, x := range all {
		if x.Index == 0 {
			p0 = append(p0, x.PowerWatts)
		} else {
			assert.Equal(t, "NVIDIA H100", x.Name)
		}
	}
	assert.Equal(t, []float64{100, 500, 700, 300, 300}, p0)
	assert.Equal(t, all, s.Stop(), "a second Stop returns the same")
	sum := Summarize(all)
	require.Len(t, sum, 2)
	assert.Equal(t, uint64(24<<30), sum[0].PeakMemory)
	assert.Equal(t, Stat{Min: 100, Median: 300, Max: 700}, sum[0].PowerWatts) // 100 300 300 500 700

	assert.Len(t, s.Samples(all[2].At, time.Time{}), 8)
	assert.Empty(t, s.Samples(time.Time{}, all[0].At.Add(-time.Nanosecond)))
	n, err := s.Errors()
	assert.Zero(t, n)
	assert.NoError(t, err)

	bad := startSampler(&Fake{Err: errors.New("boom")}, []int{0}, nil)
	assert.Empty(t, bad.Stop())
	n, err = bad.Errors()
	assert.Equal(t, 2, n)
	assert.EqualError(t, err, "boom")

	// The real ticker: at least the start and stop samples, whatever the timing.
	r := StartSampler(&Fake{Devices: []Device{{Name: "x"}}}, []int{0}, time.Hour)
	assert.Len(t, r.Stop(), 2)
}
