# Draws bench/tiered.lua's plots from their CSV files.
#
#   gnuplot -e "name='tiered_coherence'; csv='...csv'; png='...png'" bench/tiered.gp
#
# name: tiered_coherence (the delay from a set in one process to the old copy
# gone in another, as a cumulative distribution) | tiered_zipf (memory ->
# redis against redis alone on a Zipf workload, by the memory tier's size).
if (!exists("quick")) quick = 0
set terminal pngcairo size 900,560 font "Sans,11" noenhanced
set output png
set datafile separator ","
set grid xtics ytics mxtics mytics lc rgb "#dddddd"
note = quick ? " (quick mode: rough numbers)" : ""

if (name eq "tiered_coherence") {
    set title "Coherence delay of a tiered region (memory -> redis)".note."\nfrom a set in one process to the new value read from another process's memory tier"
    set xlabel "delay (ms, log scale)"
    set ylabel "fraction of sets seen"
    set logscale x
    set yrange [0:1.02]
    set xrange [*:200]
    set key bottom right box opaque
    set arrow from 100, graph 0 to 100, graph 1 nohead lc rgb "#cc0000" dt 2
    set label "target p99: 100 ms" at 100, graph 0.5 right offset -1,0 tc rgb "#cc0000"
    plot csv using 1:2 with steps lw 2 title "sets seen within the delay"
} else {
if (name eq "tiered_zipf") {
    set title "Zipf(1.0) get_or_create hits: memory -> redis against redis alone".note."\nby the size of the memory tier (bench/tiered.lua)"
    set xlabel "memory tier size (% of the keys, log scale)"
    set ylabel "µs per call (lower is better)"
    set y2label "memory tier hit rate (%)"
    set logscale x
    set xrange [0.05:60]
    set yrange [0:*]
    set y2range [0:100]
    set ytics nomirror
    set y2tics
    set key outside bottom center horizontal
    plot csv using 1:3 with linespoints lw 2 pt 7 title "memory -> redis (µs per call)" axes x1y1, \
         '' using 1:4 with linespoints lw 2 dt 2 pt 9 title "redis alone (µs per call)" axes x1y1, \
         '' using 1:5 with linespoints lw 2 pt 5 title "memory tier hit rate (%)" axes x1y2
}}
